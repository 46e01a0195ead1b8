"""Benchmark of marginal-likelihood training against a grid of fixed weight decays.

Run with ``python benchmarks/marglik_training.py`` (a few minutes on 2 cores; ``--seeds 3``
for more seeds). Two data sets from scikit-learn, standardised, split 70/30 with a fixed seed:

* digits (1,797 8x8 images, 10 classes): MLP ``64 -> 64 -> 10`` (tanh), 30 epochs, Adam lr
  1e-3, batches of 64; marglik refits every 5 epochs from epoch 5;
* diabetes (442 patients, 10 features, standardised target): MLP ``10 -> 32 -> 1`` (tanh),
  100 epochs, Adam lr 3e-3, batches of 32; marglik refits every 10 epochs from epoch 10.

Every run of a data set trains the same initial weights (seeded) with the same optimizer,
batches and number of epochs. The fixed runs use the prior
precision ``lambda`` (one for all weights) as the L2 term of the mean loss,
``(1/N) * 1/2 * lambda ||theta||^2`` (the convention of ``ltf.marglik_training``, here by
Keras ``l2`` regularizers); the marglik runs start from ``lambda = 1``, learn the prior (and
for regression ``sigma_noise``) with one Adam run on the log hyperparameters across the
refits (lr 0.1), and return the weights of the refit with the highest evidence (the default,
as laplace-torch; the epoch is printed). Marglik variants (``--variants``; by default the
first two):

* ``marglik``: one prior per layer, all-weights Kronecker Laplace, 100 hypersteps per refit
  on the schedule above;
* ``torch-schedule``: laplace-torch's defaults for the schedule: a refit after every epoch
  from the first, 10 hypersteps each (one prior per layer, Kronecker);
* ``tensorwise``: laplace-torch's ``"layerwise"`` prior, one per weight tensor (kernel and
  bias apart), which needs a per-weight prior of the posterior: all-weights *full* Laplace,
  10 hypersteps per refit on the schedule above (digits: a 4,874-weight full posterior, a
  few minutes per seed);
* ``layerwise-full``: as ``tensorwise`` with one prior per layer, to tell the prior's
  structure from the posterior's (its evidence is comparable with ``tensorwise``'s only: the
  ``log evidence`` of these two rows is the full Laplace's, of the others the Kronecker's).

Test NLL is of the MAP predictive
(softmax; Gaussian with ``sigma`` = the learned one for marglik, the training-residual RMS
for the fixed runs: no validation set is used by any run); for the marglik run also of the
returned Laplace's GLM predictive (probit link; regression variance with the noise). The log
evidence (training data only) is the all-weights Kronecker Laplace's at each run's returned
weights and prior (fixed regression runs: prior ``lambda / (2 sigma^2)`` with ``sigma`` the
training RMS, the prior their MAP's loss implies): it shows which decay the evidence itself
prefers. Numbers
are means over seeds (± the standard deviation over seeds of the test NLL; the learned values
printed are seed 0's); times are wall seconds of the whole training (marglik: with its refits).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_diabetes, load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import laplace_tf as ltf  # noqa: E402

GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
TASKS = {
    "digits": dict(likelihood="classification", hidden=64, epochs=30, lr=1e-3, batch_size=64,
                   refit_every=5),
    "diabetes": dict(likelihood="regression", hidden=32, epochs=100, lr=3e-3, batch_size=32,
                     refit_every=10),
}
VARIANTS = {  # marglik_training options; None: the task's refit_every
    "marglik": dict(n_epochs_burnin=None, marglik_frequency=None, n_hypersteps=100),
    "torch-schedule": dict(n_epochs_burnin=0, marglik_frequency=1, n_hypersteps=10),
    "tensorwise": dict(n_epochs_burnin=None, marglik_frequency=None, n_hypersteps=10,
                       prior_structure="tensorwise", hessian_structure="full"),
    "layerwise-full": dict(n_epochs_burnin=None, marglik_frequency=None, n_hypersteps=10,
                           hessian_structure="full"),
}


def _data(name: str):
    x, y = (load_digits if name == "digits" else load_diabetes)(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = (scaler.transform(a).astype("float32") for a in (x_train, x_test))
    if name == "digits":
        return x_train, y_train.astype("int32"), x_test, y_test.astype("int32")
    mean, std = y_train.mean(), y_train.std()
    return (x_train, ((y_train - mean) / std)[:, None].astype("float32"),
            x_test, ((y_test - mean) / std)[:, None].astype("float32"))


def _model(n_in: int, hidden: int, n_out: int, seed: int, decay: float | None, n: int):
    keras.utils.set_random_seed(seed)
    reg = None if decay is None else keras.regularizers.l2(decay / (2 * n))
    return keras.Sequential([
        keras.Input((n_in,)),
        keras.layers.Dense(hidden, "tanh", kernel_regularizer=reg, bias_regularizer=reg),
        keras.layers.Dense(n_out, kernel_regularizer=reg, bias_regularizer=reg)])


def _test_nll(model, likelihood, x_test, y_test, sigma) -> float:
    out = model.predict(x_test, verbose=0).astype(np.float64)
    if likelihood == "classification":
        out -= out.max(axis=1, keepdims=True)
        log_probs = out - np.log(np.exp(out).sum(axis=1, keepdims=True))
        return float(-log_probs[np.arange(len(y_test)), y_test].mean())
    return float(np.mean(0.5 * np.log(2 * np.pi * sigma**2) + (y_test - out) ** 2 / (2 * sigma**2)))


def _run(name: str, task: dict, seed: int, decay: float | None, variant: str = "marglik"):
    x, y, x_test, y_test = _data(name)
    n_out = 10 if task["likelihood"] == "classification" else 1
    model = _model(x.shape[1], task["hidden"], n_out, seed, decay, len(x))
    optimizer = keras.optimizers.Adam(task["lr"])
    start = time.perf_counter()
    if decay is None:
        options = {key: task["refit_every"] if value is None else value
                   for key, value in VARIANTS[variant].items()}
        model, la, trace = ltf.marglik_training(
            model, task["likelihood"], (x, y), epochs=task["epochs"], optimizer=optimizer,
            batch_size=task["batch_size"], seed=seed, verbose=0, **options)
        sigma = float(la.sigma_noise) if task["likelihood"] == "regression" else None
        best = int(np.argmax(trace["log_marginal_likelihood"]))
        prior = (f'{np.round(trace["prior_precision"][best].astype(float), 2).tolist()} '
                 f'(epoch {trace["epoch"][best]})')
        laplace_nll = _laplace_nll(la, task["likelihood"], x_test, y_test)
    else:
        keras.utils.set_random_seed(seed)
        loss = (keras.losses.SparseCategoricalCrossentropy(from_logits=True)
                if task["likelihood"] == "classification" else "mse")
        model.compile(optimizer, loss)
        model.fit(x, y, epochs=task["epochs"], batch_size=task["batch_size"], verbose=0)
        sigma = None
        if task["likelihood"] == "regression":
            sigma = float(np.sqrt(np.mean((model.predict(x, verbose=0) - y) ** 2)))
        prior, laplace_nll = decay, float("nan")
    seconds = time.perf_counter() - start
    if decay is not None:  # the evidence of the fixed run's own posterior (its MAP's)
        la = ltf.Laplace(model, task["likelihood"], subset_of_weights="all", progress=False,
                         hessian_structure="kron",
                         prior_precision=decay if sigma is None else decay / (2 * sigma**2),
                         sigma_noise=1.0 if sigma is None else sigma)
        la.fit((x, y))
    evidence = float(la.log_marginal_likelihood())
    nll = _test_nll(model, task["likelihood"], x_test, y_test, sigma)
    out = model.predict(x_test, verbose=0)
    score = (float(np.mean(out.argmax(1) == y_test)) if task["likelihood"] == "classification"
             else float(np.sqrt(np.mean((out - y_test) ** 2))))
    return nll, score, seconds, laplace_nll, evidence, prior, sigma


def _laplace_nll(la, likelihood, x_test, y_test) -> float:
    """Test NLL of the Laplace GLM predictive (probit link; variance with the noise)."""
    if likelihood == "classification":
        probs = np.asarray(la(x_test), np.float64)
        return float(-np.log(probs[np.arange(len(y_test)), y_test]).mean())
    mean, var = (np.asarray(a, np.float64) for a in la(x_test))
    return float(np.mean(0.5 * np.log(2 * np.pi * var) + (y_test - mean) ** 2 / (2 * var)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--variants", nargs="*", default=["marglik", "torch-schedule"],
                        choices=list(VARIANTS), help="the full-posterior ones take minutes")
    parser.add_argument("--no-grid", action="store_true", help="the marglik rows only")
    parser.add_argument("--epochs", type=int, default=None,
                        help="train this many epochs instead of the set's (same refit schedule)")
    args = parser.parse_args()
    for name in args.tasks:
        task = {**TASKS[name], **({"epochs": args.epochs} if args.epochs else {})}
        metric = "accuracy" if task["likelihood"] == "classification" else "RMSE"
        print(f"\n### {name} ({task['epochs']} epochs, {args.seeds} seed(s))\n")
        print(f"| weight decay (prior precision) | test NLL | test {metric} | train wall s "
              "| Laplace test NLL | log evidence |")
        print("|---|---:|---:|---:|---:|---:|")
        rows = []
        grid = () if args.no_grid else GRID
        for decay, variant in [*((d, None) for d in grid), *((None, v) for v in args.variants)]:
            runs = [_run(name, task, seed, decay, variant) for seed in range(args.seeds)]
            nll, score, seconds, laplace_nll, evidence = (
                float(np.mean([r[i] for r in runs])) for i in range(5))
            spread = (f" ± {np.std([r[0] for r in runs], ddof=1):.4f}"
                      if len(runs) > 1 else "")
            label = f"fixed {decay:g}" if decay is not None else (
                f"{variant}, learned {runs[0][5]}" + (
                    f", sigma {runs[0][6]:.3f}" if runs[0][6] is not None else ""))
            rows.append((decay, variant, nll))
            print(f"| {label} | {nll:.4f}{spread} | {score:.4f} | {seconds:.1f} | "
                  f"{'-' if decay is not None else f'{laplace_nll:.4f}'} | {evidence:.1f} |", flush=True)
        fixed = [nll for decay, _, nll in rows if decay is not None]
        for _, variant, learned in (row for row in rows if row[0] is None and fixed):
            print(f"\n{variant} test NLL {learned:.4f} vs best fixed {min(fixed):.4f}: "
                  f"{'at least as good' if learned <= min(fixed) else 'WORSE'}")


if __name__ == "__main__":
    main()
