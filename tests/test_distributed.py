"""Curvature under tf.distribute equals the single-device curvature, for every structure.

A strategy must be configured before TensorFlow initialises its devices, so every fit runs in
fresh processes (``tests/_workers/distributed_fit.py``, whose docstring describes the data
split):

* ``MirroredStrategy`` over two logical CPU devices: batches split unevenly over the
  replicas, a last batch smaller than the number of replicas, and the strategy given as an
  argument or active through ``strategy.scope()``;
* ``MultiWorkerMirroredStrategy`` with two worker processes on 127.0.0.1 (free ports from the
  OS), each fitting its own shard of the data with a different number of batches; one
  all-reduce gives both workers the curvature of all the data.

Cases named "weighted-..." fit ``(x, y, sample_weight)``: the weights are split with the rows.

Every fit is the public ``laplace_tf.Laplace(...).fit(data, strategy=...)`` (or ``fit(data)``
inside ``strategy.scope()``, for some cases with the model built and the prior tuned there
too); its ``la.curvature`` and prior precision are compared with a fit on one device.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _workers.distributed_fit import CASES, MULTIWORKER_CASES, N_EXAMPLES, SAMPLE_WEIGHTS

WORKER = Path(__file__).parent / "_workers" / "distributed_fit.py"
TIMEOUT_SECONDS = 240  # per configuration; a few times the ~40 s they take on two busy cores
EXACT = {"rtol": 1e-10, "atol": 1e-12}

pytestmark = pytest.mark.slow


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that the OS reports free on 127.0.0.1 (bound to port 0, closed)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run_workers(commands: list[list[str]], logs: list[Path]) -> None:
    """Run the commands concurrently; all are killed if one fails or the time runs out."""
    processes = []
    try:
        for command, log in zip(commands, logs, strict=True):
            with open(log, "wb") as out:
                processes.append(subprocess.Popen(
                    [sys.executable, str(WORKER), *command], stdout=out, stderr=subprocess.STDOUT,
                    env=_environment(),
                ))
        for process, log in zip(processes, logs, strict=True):
            try:
                code = process.wait(timeout=TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker timed out after {TIMEOUT_SECONDS} s; log:\n{_tail(log)}")
            assert code == 0, f"worker exited with {code}; log:\n{_tail(log)}"
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _tail(log: Path, n_lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n_lines:])


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory) -> dict[str, np.ndarray]:
    folder = tmp_path_factory.mktemp("mirrored")
    _run_workers([["mirrored", str(folder / "out.npz")]], [folder / "log.txt"])
    return dict(np.load(folder / "out.npz"))


@pytest.fixture(scope="module")
def multiworker(tmp_path_factory) -> list[dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("multiworker")
    ports = ",".join(str(p) for p in _free_ports(2))
    commands = [
        ["multiworker", str(folder / f"out{i}.npz"), "--index", str(i), "--ports", ports]
        for i in range(2)
    ]
    _run_workers(commands, [folder / f"log{i}.txt" for i in range(2)])
    return [dict(np.load(folder / f"out{i}.npz")) for i in range(2)]


def _fields(arrays: dict[str, np.ndarray], case: str, which: str) -> dict[str, np.ndarray]:
    prefix = f"{case}/{which}/"
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _assert_same_curvature(got: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                           case: str) -> None:
    assert sorted(got) == sorted(expected)
    n_data = SAMPLE_WEIGHTS.sum() if case.startswith("weighted") else N_EXAMPLES
    assert float(got["n_data"]) == n_data
    for field, value in expected.items():
        np.testing.assert_allclose(got[field], value, **EXACT, err_msg=field)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mirrored_strategy_equals_one_device(mirrored, case):
    assert int(mirrored["num_replicas_in_sync"]) == 2
    assert mirrored[f"{case}/replica_ids"].tolist() == [0, 1]
    _assert_same_curvature(
        _fields(mirrored, case, "distributed"), _fields(mirrored, case, "single"), case
    )


@pytest.mark.parametrize("case", MULTIWORKER_CASES)
@pytest.mark.parametrize("worker", [0, 1])
def test_multi_worker_strategy_equals_one_device(multiworker, case, worker):
    assert int(multiworker[worker]["num_replicas_in_sync"]) == 2
    assert multiworker[worker][f"{case}/replica_ids"].tolist() == [worker]
    _assert_same_curvature(
        _fields(multiworker[worker], case, "distributed"), _fields(multiworker[0], case, "single"),
        case,
    )
