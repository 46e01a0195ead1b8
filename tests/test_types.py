"""The package type-checks: mypy over ``laplace_tf`` (settings in pyproject.toml) finds no error.

CI runs only pytest, so this test is how the type checker runs in CI. To see the errors
locally: ``python -m mypy`` from the repository root.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (pip install -e '.[dev]')")
def test_mypy_finds_no_errors_in_the_package():
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        f"mypy exited with {result.returncode}:\n{result.stdout}{result.stderr}"
    )
