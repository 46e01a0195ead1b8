"""Calibration under shift: can any posterior temperature meet the shift target at all?

For each of the six digits networks of ``shift_defaults.py`` (seeds 0 and 1; 300 epochs without
weight decay, early stopping without weight decay, 300 epochs with weight decay 0.5) and each
Laplace variant (Kronecker, marglik prior: all weights with a scalar or a layerwise prior,
last layer; each also followed by the MAP's validation temperature ``tau``), sweeps the
posterior temperature ``T`` (covariance ``T (H + lambda)^-1``) over ``shift_defaults.TEMPERATURES``
and scores every ``T`` on the rotated TEST sets (0, 30, 60, 90, 180 degrees). This is an
oracle: it says whether the one-parameter family contains a point with in-distribution NLL
<= 1.05 x MAP's and NLL <= 0.8 x min(MAP, MAP + TS) at every rotation >= 30 degrees, and
how close its best point gets. If no ``T`` passes on the test sets, no validation rule for
``T`` can. It also prints what the rule "largest ``T`` with validation NLL <= (1 + m) x MAP's"
picks, m = 0 and 0.05 (chosen on validation only).

Run: ``python benchmarks/shift_frontier.py`` (about 4 minutes on 2 busy cores). Each cell is
``in-dist / MAP`` and ``worst / min(MAP, TS)``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's laplace_tf
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import shift_defaults as sd  # noqa: E402
from scipy import special  # noqa: E402

import laplace_tf as ltf  # noqa: E402
from laplace_tf import data  # noqa: E402
from laplace_tf.calibration import metrics, temperature  # noqa: E402
from laplace_tf.calibration.shift import rotate  # noqa: E402

ANGLES = [0, 30, 60, 90, 180]
VARIANTS = (("all", "scalar"), ("all", "layerwise"), ("last_layer", "scalar"))


def sweep(logits, var, labels, map_nll, base, tau):
    """``(T, val NLL, in-dist / MAP, worst / base)`` for every ``T`` of the grid."""
    out = []
    for t in sd.TEMPERATURES:
        nll = {k: metrics.nll(special.softmax(sd.probit_logits(logits[k], var[k], t) / tau, -1),
                              labels[k]) for k in logits}
        worst = max(nll[a] / base[a] for a in ANGLES if a >= 30)
        out.append((t, nll["val"], nll[0] / map_nll[0], worst))
    return out


def cell(point):
    return f"{point[2]:.3f} / {point[3]:.3f} (T {point[0]:.3g})"


def main() -> None:
    start = time.perf_counter()
    print("| network | variant | T passing on test (oracle) | closest point (oracle) "
          "| val ≤ MAP | val ≤ 1.05 × MAP |")
    print("|---|---|---|---|---|---|")
    for seed in (0, 1):
        ds = data.digits(seed=seed)
        (x, y), (xv, yv), (xt, yt) = ((s.x, s.y) for s in (ds.train, ds.val, ds.test))
        for title, wd, early in (("300 epochs", 0.0, False), ("early stopping", 0.0, True),
                                 ("weight decay 0.5", 0.5, False)):
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            model = sd.train(x, y, xv, yv, (128, 128), 10, loss, wd, 300, early, seed)
            sets = {"val": xv} | {a: rotate(xt, a) for a in ANGLES}
            labels = {"val": yv} | {a: yt for a in ANGLES}
            logits = {k: model.predict(v, verbose=0).astype(np.float64) for k, v in sets.items()}
            map_nll = {k: metrics.nll(special.softmax(logits[k], -1), labels[k]) for k in sets}
            tau = temperature.fit_temperature(logits["val"], yv)
            ts = {k: metrics.nll(temperature.scaled_probs(logits[k], tau), labels[k])
                  for k in sets}
            base = {a: min(map_nll[a], ts[a]) for a in ANGLES}
            for subset, prior in VARIANTS:
                la = ltf.Laplace(model, "classification", subset, "kron",
                                 prior_precision=wd or 1.0, progress=False)
                la.fit((x, y))
                la.optimize_prior_precision(method="marglik", prior_structure=prior,
                                            progress=False)
                var = {k: la.functional_variance(v).numpy().astype(np.float64)
                       for k, v in sets.items()}
                for post in (1.0, tau):
                    line = sweep(logits, var, labels, map_nll, base, post)
                    ok = [p[0] for p in line if p[2] <= 1.05 and p[3] <= 0.8]
                    best = min(line, key=lambda p: max(p[2] / 1.05, p[3] / 0.8))
                    picks = []
                    for m in (0.0, 0.05):
                        below = [p for p in line if p[1] <= (1 + m) * map_nll["val"]]
                        picks.append(cell(below[-1] if below else line[0]))
                    passing = f"{min(ok):.3g}-{max(ok):.3g}" if ok else "none"
                    name = f"{subset} {prior}" + (f", then / τ {tau:.2f}" if post != 1.0 else "")
                    print(f"| seed {seed}, {title} | {name} | {passing} | {cell(best)} | "
                          + " | ".join(picks) + " |", flush=True)
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
