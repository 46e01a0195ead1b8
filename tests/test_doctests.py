"""Every module's docstring examples run and pass (doctests are tests).

One parametrised test per module of the package, found by walking it, so a new module's
examples run without being listed anywhere.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import laplace_tf

SKIPPED = {"laplace_tf.__main__"}  # runs the command line on import
MODULES = sorted(
    info.name for info in pkgutil.walk_packages(laplace_tf.__path__, "laplace_tf.")
    if info.name not in SKIPPED
)
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _is_package(name: str) -> bool:
    return hasattr(importlib.import_module(name), "__path__")


@pytest.mark.parametrize("name", MODULES)
def test_module_examples_pass(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=FLAGS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"


@pytest.mark.parametrize("name", [m for m in MODULES if not _is_package(m)])
def test_every_module_has_a_worked_example(name):
    examples = doctest.DocTestFinder().find(importlib.import_module(name))
    assert any(test.examples for test in examples), f"{name} has no docstring example"


def test_the_walk_finds_the_package():
    assert {"laplace_tf.autodiff", "laplace_tf.posterior.laplace",
            "laplace_tf.predictive.laplace"} <= set(MODULES)
