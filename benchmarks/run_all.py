"""The benchmark suite: every (subset, structure) pair, its cost against plain Keras, and scaling.

Run with ``python benchmarks/run_all.py`` (about 5-10 minutes on 2 cores; ``--device /GPU:0``
runs every measurement under ``tf.device``, and refuses a device the machine does not have). It writes
``benchmarks/results.json`` (every number) and the tables of ``benchmarks/README.md``.

Set-up. Float32 MLPs ``64 -> H -> H -> 10`` (ReLU) with random weights (the timing does not
depend on training) and random 10-class data, batches of 256; ``H = 256`` (85,002 weights),
and ``H = 32`` (3,466 weights) for ``subset_of_weights="all"`` with ``"full"``, whose ``P x P``
matrices are only practical for small ``P``. Each (subset, structure) pair runs in a fresh
Python process, so that its peak memory is its own. Fits are timed as medians of
:data:`REPEATS`.

Measured, per pair, with ``N = 4,000`` inputs unless stated:

* **fit**: ``laplace_tf.Laplace(model, "classification", subset_of_weights=...,
  hessian_structure=...).fit((x, y))``, wall seconds, tracing and the posterior's
  factorisation included (what a user waits for; not the one-off costs of a process's first
  fit).
* **fit / epoch**: the fit's data-proportional compute for ``N`` inputs, ``N`` times the CPU
  time an extra input costs between fits on 1k and 16k inputs (so that tracing and the
  posterior's factorisation cancel; a one-batch fit is no baseline for the full structures,
  whose rank-deficient curvature factorises faster), over one warmed-up training epoch on
  the same data (``model.fit``, Adam). Process CPU time (all threads), which other processes
  on a shared machine disturb less than wall time.
* **predictive / forward**: ``la(x)`` (GLM, probit) on the ``N`` inputs, warmed up, over the
  compiled forward pass ``model(x)`` on the same batches (CPU time).
* **peak MiB**: the growth of the process's peak resident memory during its first fit and
  prediction: ``VmHWM`` after them minus ``VmRSS`` before, with the peak reset by writing 5 to
  ``/proc/self/clear_refs`` first (Linux); TensorFlow's traced graphs and allocator pools
  count, the model and the data do not. Beside it the memory model's estimate
  (:func:`laplace_tf.curvature.memory.estimate_memory`), which leaves TensorFlow's own
  memory out (tens of MiB, so it dominates the small structures).
* **N scaling**: the fit CPU time at ``N`` = 1k, 4k and 16k (the sizes take turns within each
  repeat), and the growth: the time 4k -> 16k inputs adds over the time 1k -> 4k adds, which
  is 4 for linear growth (four times as many inputs added).
* **width scaling**: fit / epoch (and the fit CPU seconds, as above) for ``H`` = 64, 128, 256,
  512 (not for the full structures: ``P`` or ``P^2`` grows too fast).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _device import device_scope
from _peak_memory import reset_peak, status_kib

HERE = Path(__file__).resolve().parent
PAIRS = [(s, h) for s in ("all", "last_layer") for h in ("full", "kron", "diag")]
INPUTS, CLASSES, BATCH = 64, 10, 256
HIDDEN, SMALL_HIDDEN = 256, 32
REPEATS = 3  # fits are timed as medians of this many
N_BASE, N_SCALING = 4_000, (1_000, 4_000, 16_000)
WIDTHS = (64, 128, 256, 512)
BEGIN, END = "<!-- run_all.py: begin -->", "<!-- run_all.py: end -->"


def _status_mib(field: str) -> float:
    kib = status_kib(field)
    if kib is None:
        raise OSError(f"/proc/self/status has no {field}")
    return kib / 1024


def _timed(fn: Callable[[], object], repeats: int = 1) -> dict[str, float]:
    """Median wall and process CPU seconds of ``repeats`` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus)}


class _Problem:
    """An MLP ``INPUTS -> hidden -> hidden -> CLASSES``, random data, and reference timings."""

    def __init__(self, hidden: int, n_max: int):
        import keras
        import numpy as np

        keras.utils.set_random_seed(0)
        self.model = keras.Sequential([
            keras.Input((INPUTS,)), keras.layers.Dense(hidden, "relu"),
            keras.layers.Dense(hidden, "relu"), keras.layers.Dense(CLASSES),
        ])
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(n_max, INPUTS)).astype(np.float32)
        self.y = rng.integers(0, CLASSES, n_max)
        self.model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def epoch(self, n: int) -> dict[str, float]:
        def train():
            self.model.fit(self.x[:n], self.y[:n], batch_size=BATCH, epochs=1, verbose=0)

        train()
        return _timed(train, repeats=2)

    def forward(self, n: int) -> dict[str, float]:
        import tensorflow as tf

        step = tf.function(lambda xb: self.model(xb, training=False), reduce_retracing=True)
        batches = [tf.constant(self.x[i : i + BATCH]) for i in range(0, n, BATCH)]

        def run():
            for xb in batches:
                step(xb)

        run()
        return _timed(run, repeats=3)

    def laplace(self, subset: str, structure: str):
        import laplace_tf as ltf

        return ltf.Laplace(self.model, "classification", subset_of_weights=subset,
                           hessian_structure=structure, batch_size=BATCH, progress=False)

    def fit_times(self, subset: str, structure: str, sizes: tuple[int, ...]) -> dict[int, dict]:
        """Median wall and CPU seconds of fits on each of ``sizes`` inputs.

        The sizes take turns within every repeat, so that a change of load on the machine
        affects them alike.
        """
        la = self.laplace(subset, structure)
        la.fit((self.x[:BATCH], self.y[:BATCH]))  # one-off costs of a first fit
        samples: dict[int, list] = {n: [] for n in sizes}
        for _ in range(REPEATS):
            for n, times in samples.items():
                times.append(_timed(lambda n=n: la.fit((self.x[:n], self.y[:n]))))
        return {n: {k: statistics.median(t[k] for t in times) for k in ("wall", "cpu")}
                for n, times in samples.items()}


def _per_input_cpu(times: dict[int, dict], small: int, large: int) -> float:
    """CPU seconds an extra input costs, between fits on ``small`` and ``large`` inputs."""
    return (times[large]["cpu"] - times[small]["cpu"]) / (large - small)


def run_pair(subset: str, structure: str, device: str | None = None) -> dict:
    """All measurements of one (subset, structure) pair, in this process (under
    ``tf.device(device)`` when given)."""
    with device_scope(device):
        return _measure_pair(subset, structure)


def _measure_pair(subset: str, structure: str) -> dict:
    from laplace_tf.curvature.memory import estimate_memory

    hidden = SMALL_HIDDEN if (subset, structure) == ("all", "full") else HIDDEN
    problem = _Problem(hidden, max(N_SCALING))
    la = problem.laplace(subset, structure)
    x, y = problem.x[:N_BASE], problem.y[:N_BASE]
    reset = reset_peak()
    before = _status_mib("VmRSS")
    la.fit((x, y))
    la(x)
    peak = _status_mib("VmHWM") - before if reset else None
    predictive = _timed(lambda: la(x), repeats=2)
    estimate = estimate_memory(la.subset, structure, CLASSES, BATCH, subset_of_weights=subset)
    epoch, forward = problem.epoch(N_BASE), problem.forward(N_BASE)
    scaling = problem.fit_times(subset, structure, N_SCALING)
    per_input = _per_input_cpu(scaling, N_SCALING[0], N_SCALING[-1])
    result = {
        "subset_of_weights": subset, "hessian_structure": structure, "hidden": hidden,
        "n_params": la.n_params, "n": N_BASE, "fit": scaling[N_BASE], "epoch": epoch,
        "forward": forward, "predictive": predictive, "peak_mib": peak,
        "estimate_mib": estimate.total_bytes / 2**20,
        "fit_over_epoch": per_input * N_BASE / epoch["cpu"],
        "predictive_over_forward": predictive["cpu"] / forward["cpu"],
        "n_scaling": {str(n): s for n, s in scaling.items()},
        "width_scaling": {},
    }
    if structure != "full":
        for width in WIDTHS:
            wide = _Problem(width, N_SCALING[-1])
            times = wide.fit_times(subset, structure, (N_SCALING[0], N_SCALING[-1]))
            result["width_scaling"][str(width)] = {
                "n_params": wide.laplace(subset, structure).n_params,
                "fit_cpu": N_BASE * _per_input_cpu(times, N_SCALING[0], N_SCALING[-1]),
                "epoch_cpu": wide.epoch(N_BASE)["cpu"],
            }
    return result


def _run_in_subprocess(subset: str, structure: str, device: str | None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "pair.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--pair", subset, structure,
                   "--out", str(out)] + (["--device", device] if device else [])
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"{subset}/{structure} failed:\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def markdown(results: list[dict], meta: dict) -> str:
    """The README tables of ``results`` (one dict per pair, from :func:`run_pair`)."""
    lines = [
        f"Measured {meta['date']} on {meta['machine']} ({meta['cpus']} CPUs), TensorFlow "
        f"{meta['tensorflow']}, in {meta['seconds']:.0f} s. Times are CPU seconds unless "
        "marked wall; see the docstring of `run_all.py` for every definition.",
        "",
        f"### Cost per (subset, structure), N = {N_BASE:,}",
        "",
        "| subset | structure | H | weights | fit (wall s) | fit / epoch | predictive / forward "
        "| peak MiB | estimate MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(
            f"| {r['subset_of_weights']} | {r['hessian_structure']} | {r['hidden']} | "
            f"{r['n_params']:,} | {r['fit']['wall']:.2f} | {r['fit_over_epoch']:.2f} | "
            f"{r['predictive_over_forward']:.1f} | {peak} | {r['estimate_mib']:.1f} |"
        )
    ns = [str(n) for n in N_SCALING]
    lines += [
        "",
        "### Fit time against N (CPU s of whole fits)",
        "",
        f"Growth: the time {ns[1]} -> {ns[2]} inputs adds over the time {ns[0]} -> {ns[1]} "
        "adds (4 times as many inputs: 4 for linear growth).",
        "",
        "| subset | structure | " + " | ".join(f"N = {int(n):,}" for n in ns) + " | growth |",
        "|---|---|" + "---:|" * (len(ns) + 1),
    ]
    for r in results:
        t = [r["n_scaling"][n]["cpu"] for n in ns]
        lines.append(
            f"| {r['subset_of_weights']} | {r['hessian_structure']} | "
            + " | ".join(f"{v:.2f}" for v in t) + f" | {_ratio(t[2] - t[1], t[1] - t[0])} |"
        )
    lines += [
        "",
        f"### Fit against width H (N = {N_BASE:,}): fit / epoch (fit CPU s)",
        "",
        "| subset | structure | " + " | ".join(f"H = {w}" for w in WIDTHS) + " |",
        "|---|---|" + "---:|" * len(WIDTHS),
    ]
    for r in results:
        if not r["width_scaling"]:
            continue
        cells = [r["width_scaling"][str(w)] for w in WIDTHS]
        lines.append(
            f"| {r['subset_of_weights']} | {r['hessian_structure']} | "
            + " | ".join(f"{_ratio(c['fit_cpu'], c['epoch_cpu'])} ({c['fit_cpu']:.2f})"
                         for c in cells) + " |"
        )
    return "\n".join(lines)


def write_readme(path: Path, tables: str) -> None:
    """Put ``tables`` between the markers of ``path`` (the file is created if missing)."""
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\n`python benchmarks/run_all.py` runs the suite below and rewrites the "
        "tables between the markers; the other scripts here benchmark one part each.\n\n"
        f"{BEGIN}\n{END}\n"
    )
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{tables}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=2, metavar=("SUBSET", "STRUCTURE"),
                        help="measure one pair in this process (used by the suite itself)")
    parser.add_argument("--out", type=Path, help="where --pair writes its JSON")
    parser.add_argument("--device", default=None,
                        help="run under tf.device, e.g. /GPU:0 (default: TensorFlow's placement)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.pair:
        args.out.write_text(json.dumps(run_pair(*args.pair, device=args.device)))
        return
    with device_scope(args.device):  # refuse an unknown device before any work
        pass
    start = time.perf_counter()
    results = []
    for subset, structure in PAIRS:
        print(f"{subset} / {structure} ...", flush=True)
        results.append(_run_in_subprocess(subset, structure, args.device))
    import tensorflow as tf

    meta = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": os.cpu_count(),
        "tensorflow": tf.__version__, "seconds": time.perf_counter() - start,
    }
    (HERE / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    tables = markdown(results, meta)
    write_readme(HERE / "README.md", tables)
    print(tables)


if __name__ == "__main__":
    main()
