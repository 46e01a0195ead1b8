"""Shared test set-up: quiet TensorFlow, deterministic seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)  # noqa: NPY002 (code under test may use the global generator)
    tf.random.set_seed(0)
    yield


@pytest.fixture
def case(request):
    """A :class:`cases.Case` from ``@pytest.mark.parametrize("case", cases.select(...),
    indirect=True)``; build its model and data with ``case.build(n)``."""
    return request.param
