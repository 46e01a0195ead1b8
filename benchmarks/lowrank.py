"""The low-rank posterior on the benchmark MLP: fit time against a training epoch, memory
against the ``O(P k)`` estimate, and the compute floor of any sketch of ``m`` vectors.

Run with ``python benchmarks/lowrank.py [--rank 100] [--n 4000]`` (a minute or two on 2 cores).

Set-up (as ``run_all.py``): the float32 MLP ``64 -> 256 -> 256 -> 10`` (ReLU, 85,002 weights)
with random weights and random 10-class data, batches of 256.

Measured:

* **fit**: ``Laplace(model, "classification", "all", "lowrank", rank=k).fit((x, y))`` on ``N``
  inputs, after a warm-up fit on one batch (tracing), wall and process CPU seconds; it takes
  ``power_iterations + 1`` passes over the data with ``m = k + 10`` sketch vectors.
* **epoch**: one warmed-up ``model.fit`` epoch (Adam) on the same data.
* **peak MiB**: the growth of the peak resident memory during the first fit (``VmHWM`` after
  minus ``VmRSS`` before, the peak reset first), against
  :func:`~laplace_tf.curvature.memory.estimate_memory` and its ``P k`` curvature part.
* **floor**: every sketch vector costs at least one product with the curvature per pass,
  ``J^T (Lambda (J v))`` for each example: ``J v`` and ``J^T u``, ``2 P`` flops each, against
  a training step's ``6 P`` (forward ``2 P``, backward ``4 P``) per example. So ``m`` vectors
  cost at least ``2 m / 3`` epochs of flops per pass, and at least ``m / 3`` even if the
  product cost no more than one pass through the weights. Printed beside the measured ratio.

Measured 2026-11-28 (2 shared CPUs, k = 100, N = 4,000, 2 passes): fit 9.1 s CPU against an
epoch's 0.08 s CPU, fit / epoch 115 (CPU), against a flop floor of 147 epochs for 2 passes
(73 per pass; the sketch's large matmuls run faster per flop than a training step's); peak
memory growth 507 MiB against an estimate of 1,066 MiB (0.48), the ``P k`` curvature itself
32 MiB.
"""

from __future__ import annotations

import argparse
import logging
import time

from _peak_memory import reset_peak, status_kib
from run_all import BATCH, CLASSES, HIDDEN, _Problem

from laplace_tf.curvature.lowrank import DEFAULT_OVERSAMPLING, DEFAULT_POWER_ITERATIONS


def _mib(field: str) -> float:
    kib = status_kib(field)
    return float("nan") if kib is None else kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=100)
    parser.add_argument("--n", type=int, default=4_000)
    args = parser.parse_args()

    import laplace_tf as ltf

    captured: list[str] = []
    logger = logging.getLogger("laplace_tf")
    logger.setLevel(logging.INFO)
    logger.addHandler(_Captured(captured))

    problem = _Problem(HIDDEN, args.n)
    x, y = problem.x, problem.y
    la = ltf.Laplace(problem.model, "classification", "all", "lowrank", rank=args.rank,
                     batch_size=BATCH, progress=False)
    p, k = la.n_params, args.rank
    m = min(k + DEFAULT_OVERSAMPLING, p)
    passes = DEFAULT_POWER_ITERATIONS + 1

    la.fit((x[:BATCH], y[:BATCH]))  # tracing and one-off costs
    reset = reset_peak()
    before = _mib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    la.fit((x, y))
    fit_wall, fit_cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _mib("VmHWM") - before if reset else float("nan")
    epoch = problem.epoch(args.n)

    estimate = la.memory_estimate(CLASSES, BATCH)
    per_pass_floor, optimistic_floor = 2 * m / 3, m / 3
    print(f"low-rank Laplace, MLP 64-{HIDDEN}-{HIDDEN}-{CLASSES}: P = {p:,} weights, N = "
          f"{args.n:,}, rank k = {k}, m = {m} sketch vectors, {passes} passes")
    print(f"fit:    {fit_wall:7.2f} s wall, {fit_cpu:7.2f} s CPU")
    print(f"epoch:  {epoch['wall']:7.2f} s wall, {epoch['cpu']:7.2f} s CPU")
    print(f"fit / epoch: {fit_wall / epoch['wall']:.1f} (wall), {fit_cpu / epoch['cpu']:.1f} "
          f"(CPU); target <= 10")
    print(f"floor: >= {per_pass_floor:.0f} epochs of flops per pass (4 P flops per vector and "
          f"example over a training step's 6 P), {passes * per_pass_floor:.0f} for {passes} "
          f"passes; >= {optimistic_floor:.0f} per pass even at the cost of one backward pass "
          f"per vector. The target of 10 epochs is below this floor for m = {m}"
          if optimistic_floor > 10 else f"floor: {optimistic_floor:.1f} epochs per pass")
    print(f"memory: peak growth {peak:.0f} MiB; estimate {estimate.total_bytes / 2**20:.0f} MiB "
          f"(curvature P k = {estimate.parts['curvature'] / 2**20:.0f} MiB, fit workspace "
          f"{estimate.parts['fit_workspace'] / 2**20:.0f} MiB, per batch "
          f"{estimate.parts['per_batch'] / 2**20:.0f} MiB); peak / estimate "
          f"{peak / (estimate.total_bytes / 2**20):.2f}, peak / (P k numbers) "
          f"{peak / (estimate.parts['curvature'] / 2**20):.1f}")
    print(f"captured fraction of the trace: {', '.join(captured)} (the fits' log)")


class _Captured(logging.Handler):
    """Keeps the captured fractions the fits log."""

    def __init__(self, into: list):
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        if "captures" in record.getMessage():
            self.into.append(f"{record.args[1]:.3f}")


if __name__ == "__main__":
    main()
