"""Subprocess entry point for tests/test_distributed.py: curvature fits under tf.distribute.

A ``tf.distribute`` strategy has to be set up before TensorFlow initialises its devices, so
each configuration runs in a fresh process started by the tests::

    python distributed_fit.py mirrored OUT.npz
    python distributed_fit.py multiworker OUT.npz --index I --ports P0,P1

``mirrored``: two logical CPU devices and a ``MirroredStrategy`` over them; every case of
:data:`CASES` is fitted on all :data:`N_EXAMPLES` examples in batches of :data:`BATCH_SIZE`
(a batch of 3 splits 1 + 2 over the replicas; the last batch of 1, smaller than the number of
replicas, runs on one device) with ``laplace_tf.Laplace(...).fit``, once on one device and
once under the strategy (the "built_in_scope" cases: model, fit and prior tuning by the
evidence all inside ``strategy.scope()``).

``multiworker``: worker ``I`` of a two-worker ``MultiWorkerMirroredStrategy`` on 127.0.0.1
(``TF_CONFIG`` is set here, before TensorFlow is imported). Worker 0 fits examples
``[0, SPLIT)`` in two batches, worker 1 ``[SPLIT, N_EXAMPLES)`` in one, so the workers hold
different numbers of batches; the cases are :data:`MULTIWORKER_CASES`. Worker 0 also fits all
the data on one device as the reference.

Each writes, per case, the curvatures it computed and the prior precision to ``OUT.npz`` under keys
``"{case}/{single|distributed}/{field}"`` (see :func:`curvature_arrays`), the ids of the
replicas the fit's step was traced in (``"{case}/replica_ids"``), and the strategy's
``num_replicas_in_sync``; the tests compare them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1]

N_EXAMPLES = 7
BATCH_SIZE = 3
SPLIT = 5  # multiworker: worker 0 holds examples [0, SPLIT), worker 1 the rest

# case -> (model in tests/models.py, likelihood, subset_of_weights, hessian_structure,
#          curvature, how the strategy is given: "argument", "scope", or "built_in_scope": the
#          model built, fitted and its prior tuned by the evidence, all inside the scope)
CASES = {
    "all-full-ggn": ("tanh_mlp", "classification", "all", "full", "ggn", "argument"),
    "all-full-hessian": ("relu_mlp", "regression", "all", "full", "hessian", "argument"),
    "all-kron-cnn": ("small_cnn", "classification", "all", "kron", "ggn", "argument"),
    "all-kron-batchnorm": ("with_batchnorm", "regression", "all", "kron", "ef", "scope"),
    "all-diag-cnn": ("small_cnn", "binary", "all", "diag", "ggn", "argument"),
    "all-diag-functional": ("two_branch_functional", "classification", "all", "diag", "ef",
                            "argument"),
    "last_layer-kron": ("tanh_mlp", "classification", "last_layer", "kron", "ggn", "argument"),
    "last_layer-full": ("subclassed", "regression", "last_layer", "full", "ef", "scope"),
    "last_layer-diag": ("relu_mlp", "binary", "last_layer", "diag", "ggn", "argument"),
    "weighted-all-kron-batchnorm": ("with_batchnorm", "regression", "all", "kron", "ggn",
                                    "argument"),
    "weighted-all-full-ggn": ("tanh_mlp", "classification", "all", "full", "ggn", "scope"),
    "weighted-last_layer-kron": ("tanh_mlp", "binary", "last_layer", "kron", "ef", "argument"),
    "all-lowrank": ("tanh_mlp", "regression", "all", "lowrank", "ggn", "argument"),
    "built_in_scope-all-full": ("tanh_mlp", "classification", "all", "full", "ggn",
                                "built_in_scope"),
    "built_in_scope-all-gp": ("relu_mlp", "regression", "all", "gp", "ggn", "built_in_scope"),
}
MULTIWORKER_CASES = ("all-full-ggn", "all-kron-cnn", "all-diag-cnn", "last_layer-kron",
                     "last_layer-full", "weighted-all-kron-batchnorm", "weighted-last_layer-kron",
                     "all-lowrank")
SAMPLE_WEIGHTS = np.array([2.0, 0.0, 1.0, 3.0, 0.5, 1.0, 1.5])
"""Sample weights of the cases whose names start with "weighted": ``fit((x, y, w))``."""
N_OUTPUTS = {"classification": 3, "binary": 1, "regression": 2}
SIGMA_NOISE = 0.7


def curvature_arrays(curvature) -> dict[str, np.ndarray]:
    """A :class:`~laplace_tf.curvature.base.Curvature` as flat numpy arrays.

    Keys: ``nll``, ``n_data``, ``residual_ss`` (regression), and per block ``i`` the fields
    of its NamedTuple: ``block{i}.matrix`` / ``block{i}.A``, ``.G``, ``.n`` /
    ``block{i}.diagonal``.
    """
    arrays = {"nll": np.asarray(curvature.nll), "n_data": np.asarray(curvature.n_data)}
    if curvature.residual_ss is not None:
        arrays["residual_ss"] = np.asarray(curvature.residual_ss)
    for i, block in enumerate(curvature.blocks):
        for field, value in block._asdict().items():
            arrays[f"block{i}.{field}"] = np.asarray(value)
    return arrays


def _recording_replicas(likelihood, replica_ids: set[int]) -> None:
    """Make ``likelihood.nll_per_example`` note the ids of the replicas it is traced in.

    The fit's compiled step calls it; ``strategy.run`` traces the step in every replica.
    Called outside a replica context (one device), it notes nothing.
    """
    import tensorflow as tf

    nll = likelihood.nll_per_example

    def recorded(logits, y):
        context = tf.distribute.get_replica_context()
        if tf.distribute.has_strategy() and context is not None:
            replica_ids.add(int(tf.get_static_value(context.replica_id_in_sync_group)))
        return nll(logits, y)

    likelihood.nll_per_example = recorded


def _fit(case: str, rows: slice, strategy, replica_ids: set[int] | None = None):
    """The ``Laplace`` fitted for ``case`` on examples ``rows``.

    Without a strategy on one device; else with ``fit(..., strategy=)`` or inside
    ``strategy.scope()``, as the case says. A "built_in_scope" case is also built in the
    scope and its prior tuned there (on one device: the same calls, no scope).
    """
    import contextlib

    model_name, likelihood_name, subset_name, structure, kind, via = CASES[case]
    if via == "built_in_scope":
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            la = _fitted(case, rows, None, replica_ids)
            la.optimize_prior_precision(method="marglik")
        return la
    return _fitted(case, rows, strategy, replica_ids)


def _fitted(case: str, rows: slice, strategy, replica_ids: set[int] | None):
    from models import MODELS, targets

    import laplace_tf as ltf

    model_name, likelihood_name, subset_name, structure, kind, via = CASES[case]
    n_outputs = N_OUTPUTS[likelihood_name]
    model, x = MODELS[model_name](n_outputs, seed=1, n=N_EXAMPLES)
    y = targets(likelihood_name, n_outputs, N_EXAMPLES, seed=1)
    la = ltf.Laplace(
        model, likelihood_name, subset_of_weights=subset_name, hessian_structure=structure,
        curvature=kind, sigma_noise=SIGMA_NOISE if likelihood_name == "regression" else 1.0,
        on_indefinite="clip", batch_size=BATCH_SIZE, progress=False,
    )
    if replica_ids is not None:
        _recording_replicas(la.likelihood, replica_ids)
    data = (x[rows], y[rows], *([SAMPLE_WEIGHTS[rows]] if case.startswith("weighted") else []))
    if strategy is None:
        la.fit(data)
    elif via == "scope":
        with strategy.scope():
            la.fit(data)
    else:
        la.fit(data, strategy=strategy)
    return la


def _run(strategy, cases, rows: slice, reference: bool, out: str) -> None:
    arrays = {"num_replicas_in_sync": np.asarray(strategy.num_replicas_in_sync)}
    for case in cases:
        replica_ids: set[int] = set()
        fits = {"distributed": _fit(case, rows, strategy, replica_ids)}
        arrays[f"{case}/replica_ids"] = np.array(sorted(replica_ids))
        if reference:
            fits["single"] = _fit(case, slice(0, N_EXAMPLES), None)
        for which, la in fits.items():
            fields = {**curvature_arrays(la.curvature),
                      "prior_precision": np.asarray(la.prior_precision)}
            arrays.update({f"{case}/{which}/{k}": v for k, v in fields.items()})
    np.savez(out, **arrays)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("mirrored", "multiworker"))
    parser.add_argument("out")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--ports", default="")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(TESTS), str(TESTS.parent)]  # tests/models.py and the package
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.mode == "multiworker":
        workers = [f"127.0.0.1:{port}" for port in args.ports.split(",")]
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": args.index}}
        )
    import tensorflow as tf

    if args.mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        _run(strategy, CASES, slice(0, N_EXAMPLES), True, args.out)
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        rows = slice(0, SPLIT) if args.index == 0 else slice(SPLIT, N_EXAMPLES)
        _run(strategy, MULTIWORKER_CASES, rows, args.index == 0, args.out)


if __name__ == "__main__":
    main()
