"""The ``laplace-tf`` command: ``demo``, ``fit``, ``report``, ``export`` and ``shift``.

::

    laplace-tf demo [--out DIR] [--fast] [--quiet]
    laplace-tf fit [--config configs/NAME.yaml] [--hessian-structure diag ...] [--out DIR]
    laplace-tf report POSTERIOR.npz --model M.keras --test DATA.npz [--ood DATA.npz] [--out DIR]
    laplace-tf export POSTERIOR.npz --model M.keras --out DIR [--pred-type nn ...]
    laplace-tf shift --config configs/shift_digits.yaml [--out DIR] [--quiet]

Every key of a run config (:mod:`laplace_tf.config`) is also a flag of ``fit``
(``laplace.prior_precision`` -> ``--prior-precision``); flags override the file. Exit status:
0 on success, 2 on bad usage or bad input, with one line on stderr saying what was wrong (add
``--debug`` before the command for the traceback).

Example:
    >>> main(["fit", "--config", "no/such/file.yaml"])
    2
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from laplace_tf import config as _config  # noqa: E402

PROG = "laplace-tf"
USER_ERRORS = (ValueError, TypeError, OSError, zipfile.BadZipFile)
"""Errors caused by the user's input: reported in one line, exit status 2."""
_PREDICTIVE_KEYS = ("predictive.pred_type", "predictive.link_approx", "predictive.n_samples",
                    "data.target_column")
_EXPORT_KEYS = (*_PREDICTIVE_KEYS[:3], "seed")


class UsageError(Exception):
    """A command line argparse rejected."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _add_config_flags(parser: argparse.ArgumentParser, keys: Sequence[str]) -> None:
    """One flag per config key; values stay strings and are checked by the config schema."""
    for key in keys:
        spec = _config.FIELDS[key]
        choices = spec.metadata.get("choices")
        shown = f"{{{','.join(choices)}}}" if choices else "VALUE"
        parser.add_argument(spec.flag, dest=key, default=None, metavar=shown,
                            help=f"{spec.metadata['help']} [{key}, default {spec.default!r}]")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``laplace-tf`` with its four subcommands."""
    parser = _Parser(prog=PROG, description="Post-hoc Laplace approximations for Keras models.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of errors")
    commands = parser.add_subparsers(dest="command", metavar="{demo,fit,report,export,shift}",
                                     parser_class=_Parser)

    demo = commands.add_parser(
        "demo", help="the whole pipeline on built-in data (digits, 1-D regression)",
        description="Train MAP networks on digits (with rotated digits as OOD) and a 1-D "
        "regression problem, fit Laplace (last-layer Kronecker for the classifier, all-weights "
        "full for the regressor) with the prior tuned by marglik, and write report.html, "
        "metrics.json, posteriors, models and plots.")
    demo.add_argument("--out", default="laplace_tf_out", help="output folder [laplace_tf_out]")
    demo.add_argument("--fast", action="store_true", help="few epochs (for tests)")

    fit = commands.add_parser(
        "fit", help="fit a Laplace posterior from a YAML config and/or flags",
        description="Train or load the MAP model, fit Laplace, tune the prior, predict and "
        "report. Flags override the config file.")
    fit.add_argument("--config", help="a YAML run config (see configs/)")
    _add_config_flags(fit, list(_config.FIELDS))

    report = commands.add_parser(
        "report", help="a calibration report on new data from a saved posterior",
        description="Load a saved posterior for a saved Keras model and report MAP vs Laplace "
        "on test (and out-of-distribution) data.")
    report.add_argument("posterior", help="a posterior saved by la.save or laplace-tf fit (.npz)")
    report.add_argument("--model", required=True, help="the .keras model of the posterior")
    report.add_argument("--test", required=True, help="test data: .npz (x, y) or .csv")
    report.add_argument("--ood", help="out-of-distribution data: .npz (x, y) or .csv")
    report.add_argument("--out", default="laplace_tf_out", help="output folder [laplace_tf_out]")
    _add_config_flags(report, _PREDICTIVE_KEYS)

    export = commands.add_parser(
        "export", help="a saved posterior's predictive as a TensorFlow SavedModel",
        description="Load a saved posterior for a saved Keras model and write its predictive "
        "as a SavedModel that runs without laplace_tf (signature serving_default: inputs -> "
        "probs or mean/variance, and functional_variance).")
    export.add_argument("posterior", help="a posterior saved by la.save or laplace-tf fit (.npz)")
    export.add_argument("--model", required=True, help="the .keras model of the posterior")
    export.add_argument("--out", required=True, help="the SavedModel folder to write")
    _add_config_flags(export, _EXPORT_KEYS)  # the seed: of the nn weight samples
    export.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="dtype of the served inputs and outputs [float32]")
    export.add_argument("--max-bytes", type=int, default=None,
                        help="refuse a SavedModel estimated larger than this [2 GiB]")

    shift = commands.add_parser(
        "shift", help="baselines and Laplace variants under dataset shift, from a YAML config",
        description="Train the MAP network (and a deep ensemble), fit the config's Laplace "
        "variants, evaluate every predictor on shifted test sets and write report.html, "
        "shift.json and plots (see laplace_tf.shift_run).")
    shift.add_argument("--config", required=True, help="a YAML shift config (see configs/)")
    shift.add_argument("--out", default=None, help="output folder [the config's out]")

    for command in (demo, fit, report, export, shift):
        command.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    return parser


def _echo(quiet: bool):
    return (lambda message: None) if quiet else (lambda message: print(message, flush=True))


def _flag_values(args: argparse.Namespace, keys: Sequence[str]) -> dict[str, str]:
    return {key: getattr(args, key) for key in keys if getattr(args, key) is not None}


def _output_folder(path, argument: str = "--out") -> None:
    """Make the output folder before the work, so that a path that cannot be one fails first."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"{argument}: cannot make the folder {str(path)!r}: "
                      f"{err.strerror or err}") from None


def _demo(args: argparse.Namespace) -> int:
    from laplace_tf import run

    _output_folder(args.out)
    result = run.run_demo(Path(args.out), fast=args.fast, progress=False if args.quiet else None,
                          log=_echo(args.quiet))
    print(result.table())
    print(f"wrote {result.out} in {result.seconds:.0f} s")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from laplace_tf import run

    flags = _flag_values(args, list(_config.FIELDS))
    if args.config:
        config = _config.load_config(args.config, flags)
    else:
        config = _config.override(_config.RunConfig(), flags)
    _output_folder(config.out, "--out" if "out" in flags else "out")
    result = run.run_config(config, progress=False if args.quiet else None, log=_echo(args.quiet))
    print(result.table())
    print(f"wrote {result.out} in {result.seconds:.0f} s")
    return 0


def _report(args: argparse.Namespace) -> int:
    from laplace_tf import run

    values = _config.parse_values(_flag_values(args, _PREDICTIVE_KEYS))
    predictive = _config.PredictiveConfig(**{
        key.split(".")[1]: value for key, value in values.items() if key.startswith("predictive.")
    })
    _output_folder(args.out)
    result = run.report_saved(
        Path(args.posterior), Path(args.model), Path(args.test),
        ood=Path(args.ood) if args.ood else None, out=Path(args.out), predictive=predictive,
        target_column=values.get("data.target_column", -1), progress=False if args.quiet else None,
        log=_echo(args.quiet))
    print(result.table())
    print(f"wrote {result.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import laplace_tf
    from laplace_tf import run
    from laplace_tf.predictive.export import DEFAULT_MAX_BYTES

    values = _config.parse_values(_flag_values(args, _EXPORT_KEYS))
    seed = values.pop("seed", _config.FIELDS["seed"].default)
    options = {key.split(".")[1]: value for key, value in values.items()}
    posterior = Path(args.posterior)
    if not posterior.is_file():
        raise FileNotFoundError(f"posterior: no such file {str(posterior)!r}")
    la = laplace_tf.load(posterior, run.load_model(args.model, "--model"))
    _output_folder(Path(args.out).parent)  # the SavedModel folder itself is the export's
    info = la.export(args.out, seed=seed, dtype=args.dtype, max_bytes=DEFAULT_MAX_BYTES
                     if args.max_bytes is None else args.max_bytes, **options)
    print(f"wrote {info.path}: signature serving_default, inputs -> {', '.join(info.outputs)} "
          f"(about {info.estimated_bytes:,} bytes of arrays)")
    return 0


def _shift(args: argparse.Namespace) -> int:
    from laplace_tf import shift_run

    config, section = shift_run.load_shift_config(args.config)
    if args.out:
        config = _config.override(config, {"out": args.out})
    _output_folder(config.out, "--out" if args.out else "out")
    result = shift_run.run_shift(config, section, progress=False if args.quiet else None, log=_echo(args.quiet))
    print(shift_run.summary(result.table, next(iter(result.table.parameters))))
    print(f"wrote {result.out} in {result.seconds:.0f} s")
    return 0


_COMMANDS = {"demo": _demo, "fit": _fit, "report": _report, "export": _export, "shift": _shift}


def _one_line(error: BaseException) -> str:
    return " ".join((str(error).strip() or type(error).__name__).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``laplace-tf`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    if args.command is None:
        print(f"{PROG}: error: choose a command: demo, fit, report, export or shift (see {PROG} --help)",
              file=sys.stderr)
        return 2
    if not args.debug:
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # TensorFlow's tracing notes are not for users
    try:
        return _COMMANDS[args.command](args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"{PROG} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
