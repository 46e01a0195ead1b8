"""Benchmark: all-weights Kronecker and diagonal GGN fits of a wide MLP, old code against new.

Run with ``python benchmarks/wide_kron.py`` (about 3 minutes on 2 cores; ``--small`` for a
quick check with 2,000 inputs). The case: MLP 256-512-512-20 (ReLU, 404,500
weights), N = 20,000 random inputs, batch 256, float32, softmax likelihood, fitted with
``ltf.Laplace(model, "classification", "all", structure).fit(...)``:

* ``kron``: the exact Kronecker GGN (the output Hessian's K = 20 square-root columns pushed
  back through the network);
* ``diag``: the exact diagonal GGN;
* ``MC``: the Monte-Carlo Kronecker GGN (``stochastic=True``: one sampled output an example).

Each (code, structure) runs in a fresh Python process (``PYTHONPATH`` set to the code's tree),
which first times one training epoch (``model.fit``, Adam, warmed up; median of 3), then the
first fit in the process ("cold": includes tracing the compiled step) and ``--repeats``
further fits ("warm": median). The old code is a git worktree of the commit before this
benchmark (``--old``, default ``/tmp/old-wide``; make it with
``git worktree add --detach /tmp/old-wide 29f6b6b``); without it only the new code runs.

Times are process CPU seconds (all threads; the ratios use them, because on a shared machine
other processes stretch wall times at random), with wall seconds beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD = Path("/tmp/old-wide")
WIDTHS = (256, 512, 512, 20)
BATCH = 256
STRUCTURES = {"kron": {}, "diag": {}, "MC": {"stochastic": True}}


def worker(structure: str, n: int, repeats: int) -> dict:
    """Epoch time, then cold and warm fit times of one structure (in this process)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    import laplace_tf as ltf

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((WIDTHS[0],))]
                             + [keras.layers.Dense(w, activation="relu") for w in WIDTHS[1:-1]]
                             + [keras.layers.Dense(WIDTHS[-1])])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, WIDTHS[0])).astype("float32")
    y = rng.integers(WIDTHS[-1], size=n)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:2 * BATCH], y[:2 * BATCH], batch_size=BATCH, verbose=0)
    epochs = [_timed(lambda: model.fit(x, y, batch_size=BATCH, verbose=0)) for _ in range(3)]
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    hessian = "diag" if structure == "diag" else "kron"

    def fit() -> tuple[float, float]:
        la = ltf.Laplace(model, "classification", subset_of_weights="all",
                         hessian_structure=hessian, progress=False, **STRUCTURES[structure])
        return _timed(lambda: la.fit(data))

    cold = fit()
    warm = [fit() for _ in range(repeats)]
    return {"epoch": _median(epochs), "cold": cold, "warm": _median(warm),
            "laplace_tf": ltf.__file__}


def _timed(fn) -> tuple[float, float]:
    """CPU seconds (this process, all threads) and wall seconds of ``fn()``."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def _median(times: list) -> tuple[float, float]:
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def run(tree: Path, structure: str, n: int, repeats: int) -> dict:
    """:func:`worker` in a fresh process importing ``laplace_tf`` from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", structure, "--n", str(n), "--repeats", str(repeats)],
        env=env, cwd=tree, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["laplace_tf"].startswith(str(tree)), (tree, result["laplace_tf"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2,000 inputs instead of 20,000")
    parser.add_argument("--repeats", type=int, default=3, help="warm fits per process")
    parser.add_argument("--old", type=Path, default=OLD, help="worktree of the old code")
    parser.add_argument("--worker", choices=list(STRUCTURES), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.repeats)))
        return
    n = 2_000 if args.small else 20_000
    trees = {"new": ROOT}
    if (args.old / "laplace_tf").is_dir():
        trees = {"old": args.old, **trees}
    else:
        print(f"no old code at {args.old}: timing the new code only")
    results = {}
    for s in STRUCTURES:
        for code, tree in trees.items():
            results[code, s] = run(tree, s, n, args.repeats)
            print(code, s, results[code, s], file=sys.stderr, flush=True)
    epoch = [statistics.median(r["epoch"][i] for r in results.values()) for i in (0, 1)]
    print(f"MLP {'-'.join(map(str, WIDTHS))}, N = {n:,}, batch {BATCH}, float32; one training "
          f"epoch {epoch[0]:.2f} CPU s, {epoch[1]:.2f} wall s (median over processes)\n")
    print("| fit | code | cold CPU s | warm CPU s | cold / epoch | warm / epoch | old / new cold "
          "| old / new warm | cold wall s | warm wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (code, s), r in results.items():
        old = results.get(("old", s))
        cold, warm = r["cold"], r["warm"]
        speedup = (f"{old['cold'][0] / cold[0]:.2f} | {old['warm'][0] / warm[0]:.2f}"
                   if code == "new" and old else " | ")
        print(f"| {s} | {code} | {cold[0]:.2f} | {warm[0]:.2f} | {cold[0] / epoch[0]:.1f} | "
              f"{warm[0] / epoch[0]:.1f} | {speedup} | {cold[1]:.2f} | {warm[1]:.2f} |")

if __name__ == "__main__":
    main()
