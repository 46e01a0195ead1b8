"""Benchmark of the full (dense) structure: this code against an older commit, side by side.

Run with ``python benchmarks/full_structure.py`` (a few minutes; ``--n-wide 20000`` for the
wide case at N = 20,000, ``--old-commit ''`` to skip the old code). Each (code, case) runs in a
fresh Python process, the old code from ``git archive`` of ``--old-commit`` on
``PYTHONPATH``. Float32, random weights (the timing does not depend on training), random
labels, batches of 256, wall seconds:

* ``small``: all weights of an MLP ``64 -> 32 -> 32 -> 10`` (ReLU, P = 3,466), N = 4,000:
  ``fit`` (median of 3 fits after a first one), ``curvature`` (the curvature sums alone),
  ``cholesky`` (one ``tf.linalg.cholesky`` of a ``P x P`` precision), ``predict`` (GLM probit on
  500 inputs, first call after the fit, then ``warm``), ``sample`` (100 weight samples),
  ``tune`` (100 steps of marglik tuning of a scalar prior, first call, then ``again``).
  Target: fit <= 1.5 (curvature + cholesky). The first tuning's floor: ``eigvalsh_1thread``
  and ``eigvalsh_2thread`` (eigenvalues only, ``evd``), ``gemm_gflops`` (one P x P matmul)
  and ``tridiagonal_floor`` (the reduction's 4/3 P^3 flops at that rate).
* ``wide``: the last layer of an MLP ``256 -> 512 -> 512 -> 20`` (P = 10,260), N =
  ``--n-wide``: the same figures but one fit, and the floor: ``gemm`` (one compiled matmul per
  2,048 examples doing the multiply-adds of the packed sums, ``N d (d + 1) / 2 K (K + 1) / 2``)
  and ``cholesky``. Target: fit <= 2 (gemm + cholesky).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
CASES = {"small": dict(inputs=64, hidden=(32, 32), classes=10, n=4000, subset="all"),
         "wide": dict(inputs=256, hidden=(512, 512), classes=20, n=20000, subset="last_layer")}
N_TEST, BATCH, STEP = 500, 256, 2048


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(name: str, n: int) -> dict[str, float]:
    """The figures of one case with the ``laplace_tf`` on ``sys.path``."""
    import keras
    import numpy as np
    import tensorflow as tf

    import laplace_tf as ltf
    from laplace_tf.batches import Batches
    from laplace_tf.curvature.base import fit_curvature

    spec = CASES[name]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((spec["inputs"],))]
                             + [keras.layers.Dense(h, "relu") for h in spec["hidden"]]
                             + [keras.layers.Dense(spec["classes"])])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, spec["inputs"])).astype(np.float32)
    y = rng.integers(0, spec["classes"], n)
    x_test = x[:N_TEST]

    def fresh():
        return ltf.Laplace(model, "classification", subset_of_weights=spec["subset"],
                           hessian_structure="full", batch_size=BATCH, progress=False)

    out: dict[str, float] = {}
    if name == "small":
        fresh().fit((x[:BATCH], y[:BATCH]))  # the process's one-off costs
        out["fit"] = statistics.median(_seconds(lambda: fresh().fit((x, y))) for _ in range(3))
    la = fresh()
    out.setdefault("fit", _seconds(lambda: la.fit((x, y))))
    out["curvature"] = _seconds(lambda: fit_curvature(
        la._builder(), Batches((x, y), BATCH, dtype=tf.float32, progress=False)))
    out["predict"] = _seconds(lambda: la(x_test, link_approx="probit"))
    out["warm"] = _seconds(lambda: la(x_test, link_approx="probit"))
    out["sample"] = _seconds(lambda: la.sample(100, seed=0))
    if name == "small":
        out["tune"] = _seconds(lambda: la.optimize_prior_precision(method="marglik", n_steps=100))
        out["again"] = _seconds(lambda: la.optimize_prior_precision(method="marglik", n_steps=100))

    matrix = la.curvature.blocks[0].matrix + tf.eye(la.n_params)
    tf.linalg.cholesky(matrix)  # warm-up
    out["cholesky"] = _seconds(lambda: tf.linalg.cholesky(matrix).numpy())
    if name == "small":  # the first tuning's floor: eigenvalues only, and the GEMM rate
        import scipy.linalg
        from threadpoolctl import threadpool_limits

        h = la.curvature.blocks[0].matrix.numpy()
        for threads in (1, 2):
            with threadpool_limits(threads, user_api="blas"):
                out[f"eigvalsh_{threads}thread"] = _seconds(lambda: scipy.linalg.eigh(
                    h, eigvals_only=True, driver="evd", check_finite=False))
        square = np.asarray(h, np.float32)
        out["gemm_gflops"] = 2 * h.shape[0] ** 3 / _seconds(lambda: square @ square) / 1e9
        out["tridiagonal_floor"] = 4 / 3 * h.shape[0] ** 3 / (out["gemm_gflops"] * 1e9)
    if name == "wide":
        d, k = spec["hidden"][-1] + 1, spec["classes"]
        pairs = tf.random.normal([d * (d + 1) // 2, STEP])
        outputs = tf.random.normal([STEP, k * (k + 1) // 2])
        gemm = tf.function(lambda a, b: tf.matmul(a, b))
        gemm(pairs, outputs)
        out["gemm"] = _seconds(lambda: [gemm(pairs, outputs).numpy()
                                        for _ in range(-(-n // STEP))]) * (n / (-(-n // STEP) * STEP))
    return out


def _in_subprocess(tree: Path, name: str, n: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    result = subprocess.run([sys.executable, str(HERE / "full_structure.py"), "--child", name,
                             "--n-wide", str(n)], env=env, capture_output=True, text=True,
                            cwd=tempfile.gettempdir(), check=False)
    if result.returncode:
        raise RuntimeError(f"{name} under {tree} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _old_tree(commit: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", commit, "laplace_tf"], cwd=HERE.parent,
                             capture_output=True, check=True).stdout
    target = into / "old"
    target.mkdir()
    archive_path = into / "old.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(target, filter="data")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-wide", type=int, default=4000, help="N of the wide case")
    parser.add_argument("--old-commit", default="29f6b6b", help="'' to skip the old code")
    parser.add_argument("--cases", default="small,wide")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        n = args.n_wide if args.child == "wide" else CASES[args.child]["n"]
        print(json.dumps(run_case(args.child, n)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"new": HERE.parent}
        if args.old_commit:
            trees = {"old": _old_tree(args.old_commit, Path(tmp)), **trees}
        for name in args.cases.split(","):
            n = args.n_wide if name == "wide" else CASES[name]["n"]
            results = {label: _in_subprocess(tree, name, n) for label, tree in trees.items()}
            keys = list(results["new"])
            print(f"\n{name} (N = {n:,}), wall s")
            print("| figure | " + " | ".join(results) + " |")
            print("|---|" + "---:|" * len(results))
            for key in keys:
                print(f"| {key} | " + " | ".join(
                    f"{r[key]:.3g}" if key in r else "-" for r in results.values()) + " |")
            new = results["new"]
            floor = ("curvature", 1.5) if name == "small" else ("gemm", 2.0)
            limit = floor[1] * (new[floor[0]] + new["cholesky"])
            print(f"new fit {new['fit']:.3g} s against {floor[1]} x ({floor[0]} + cholesky) = "
                  f"{limit:.3g} s: {'met' if new['fit'] <= limit else 'NOT met'}", flush=True)


if __name__ == "__main__":
    main()
