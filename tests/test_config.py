"""Run configs: the shipped YAML files, defaults, unknown keys, types, overrides, consistency."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from laplace_tf import config as cfg

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DIGITS = {"data": {"dataset": "digits"}}


def _with(section: str, **values) -> dict:
    return {**DIGITS, section: values} if section != "data" else {"data": {**DIGITS["data"], **values}}


RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("shift_"))
SHIFT_CONFIGS = sorted(CONFIGS.glob("shift_*.yaml"))  # a run config plus a shift: section


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_is_valid_and_names_itself(path):
    config = cfg.load_config(path)
    assert config.name == path.stem
    assert cfg.from_dict(cfg.to_dict(config)) == config  # round trip through plain dicts


@pytest.mark.parametrize("path", SHIFT_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_shift_config_is_valid_and_names_itself(path):
    from laplace_tf.shift_run import load_shift_config

    config, section = load_shift_config(path)
    assert config.name == path.stem and section["shifts"]


def test_one_example_config_per_subset_and_structure():
    pairs = {(c.laplace.subset_of_weights, c.laplace.hessian_structure)
             for c in map(cfg.load_config, RUN_CONFIGS)}
    assert pairs == {(s, h) for s in ("last_layer", "all") for h in ("kron", "full", "diag")} | {
        ("all", "lowrank"), ("subnetwork", "full")}


@pytest.mark.parametrize("task", list(cfg.DEMO_CONFIGS))
def test_demo_config_files_match_the_built_in_demo(task):
    assert cfg.load_config(CONFIGS / f"demo_{task}.yaml") == cfg.demo_config(task)
    assert cfg.demo_config(task, fast=True).model.epochs == max(
        1, cfg.demo_config(task).model.epochs // cfg.FAST_EPOCH_DIVISOR)


def test_missing_keys_take_the_dataclass_defaults():
    config = cfg.from_dict(DIGITS)
    assert config.laplace == cfg.LaplaceConfig()
    assert config.model == cfg.ModelConfig()
    assert config.data == cfg.DataConfig(dataset="digits")
    assert cfg.likelihood_of(config) == "classification"


def test_likelihood_of_an_unvalidated_config_without_data_set_or_likelihood_is_a_clear_error():
    with pytest.raises(ValueError, match="laplace.likelihood: required"):
        cfg.likelihood_of(cfg.RunConfig())


UNKNOWN_KEYS = [
    (_with("laplace", hessian_structur="kron"), (
        "unknown key 'laplace.hessian_structur'", "did you mean 'laplace.hessian_structure'",
        "valid keys in 'laplace': likelihood, subset_of_weights, hessian_structure, curvature, "
        "prior_precision, sigma_noise, temperature, optimize_prior, prior_structure")),
    ({**DIGITS, "hessian_structure": "kron"}, (
        "unknown key 'hessian_structure'", "did you mean 'laplace.hessian_structure'",
        "valid keys at the top level: name, seed, out, data, model, laplace, predictive")),
    ({**DIGITS, "modle": {"epochs": 3}}, (
        "unknown key 'modle'", "did you mean 'model'", "valid keys at the top level")),
    ({**DIGITS, "predictive": {"samples": 3}}, (
        "unknown key 'predictive.samples'", "did you mean 'predictive.n_samples'",
        "valid keys in 'predictive': pred_type, link_approx, n_samples")),
    ({"data": {"dataset": "digits", "xyz": 1}}, (
        "unknown key 'data.xyz'",
        "valid keys in 'data': dataset, train, val, test, ood, target_column, test_fraction")),
]


@pytest.mark.parametrize("raw, fragments", UNKNOWN_KEYS)
def test_unknown_keys_are_named_with_a_suggestion_and_the_valid_keys(raw, fragments):
    with pytest.raises(ValueError) as info:
        cfg.from_dict(raw, where="run.yaml")
    message = str(info.value)
    assert message.startswith("run.yaml: ")
    for fragment in fragments:
        assert fragment in message


BAD_VALUES = [
    (_with("laplace", hessian_structure="kronecker"),
     "laplace.hessian_structure: expected one of kron, full, diag, lowrank, gp; got 'kronecker' "
     "(did you mean 'kron'?)"),
    (_with("laplace", prior_precision=-1), "laplace.prior_precision: expected a positive finite number"),
    (_with("laplace", prior_precision="abc"), "laplace.prior_precision: expected a number; got 'abc'"),
    (_with("laplace", prior_precision=True), "laplace.prior_precision: expected a number; got True"),
    (_with("model", epochs=2.5), "model.epochs: expected an integer; got 2.5"),
    (_with("model", epochs=0), "model.epochs: expected a positive finite number; got 0"),
    (_with("model", learning_rate=float("inf")),
     "model.learning_rate: expected a positive finite number; got inf"),
    (_with("model", hidden=64), "model.hidden: expected a list of integers like [64, 64]; got 64"),
    (_with("model", hidden=[64, -1]), "model.hidden: widths must be positive"),
    (_with("model", activation=3), "model.activation: expected a string; got 3"),
    (_with("model", dtype=None), "model.dtype: a value is required (default 'float32')"),
    (_with("data", test_fraction=1.5), "data.test_fraction: expected a fraction between 0 and 1"),
    ({**DIGITS, "seed": -1}, "seed: expected an integer in [0, 2**32); got -1"),
    ({**DIGITS, "seed": 2**32}, "seed: expected an integer in [0, 2**32); got 4294967296"),
    ({**DIGITS, "laplace": ["kron"]}, "section 'laplace' must be a mapping"),
    (["digits"], "the config must be a mapping"),
]


@pytest.mark.parametrize("raw, message", BAD_VALUES)
def test_wrong_types_and_values_name_the_key(raw, message):
    with pytest.raises(ValueError) as info:
        cfg.from_dict(raw, where="run.yaml")
    assert message in str(info.value)


INCONSISTENT = [
    ({"data": {}}, "give exactly one of data.dataset"),
    ({"data": {"dataset": "digits", "train": "a.npz"}}, "got both"),
    (_with("laplace", likelihood="regression"),
     "the built-in data set 'digits' needs 'classification'; got 'regression'"),
    ({"data": {"train": "a.npz"}}, "laplace.likelihood: required with data from files"),
    ({"data": {"train": "a.npz"}, "laplace": {"likelihood": "binary",
                                             "optimize_prior": "gridsearch"}},
     "'gridsearch' needs validation data; set data.val or use 'marglik'"),
    (_with("laplace", rank=20), "laplace.rank: only used with hessian_structure 'lowrank'"),
    (_with("laplace", n_context=20), "laplace.n_context: only used with hessian_structure 'gp'"),
    ({"data": {"dataset": "digits", "test": "t.npz"}},
     "data.val, data.test: files go with data.train; the built-in data set 'digits' brings"),
]


@pytest.mark.parametrize("raw, message", INCONSISTENT)
def test_inconsistent_settings_are_refused(raw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.from_dict(raw)


def test_gridsearch_with_a_built_in_set_uses_its_validation_split():
    config = cfg.from_dict(_with("laplace", optimize_prior="gridsearch"))
    assert config.laplace.optimize_prior == "gridsearch"


def test_flags_override_the_file_and_are_converted(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**DIGITS, "laplace": {"prior_precision": 3.0},
                                    "data": {"dataset": "digits", "ood": "digits_noisy"}}))
    config = cfg.load_config(path, {"laplace.prior_precision": "1e-3", "model.hidden": "16,8",
                                    "seed": "4", "data.ood": "none"})
    assert (config.laplace.prior_precision, config.model.hidden, config.seed, config.data.ood) == (
        0.001, [16, 8], 4, None)
    assert cfg.load_config(path).laplace.prior_precision == 3.0


def test_flag_errors_name_the_flag():
    with pytest.raises(ValueError, match="^--hessian-structure: expected one of kron, full, diag"):
        cfg.parse_values({"laplace.hessian_structure": "dense"})
    with pytest.raises(ValueError, match="^--model: expected a string"):
        cfg.parse_values({"model.path": 3})


def test_yaml_numbers_without_a_dot_are_accepted():
    # PyYAML reads 1e-3 as a string (YAML 1.1 wants 1.0e-3); the schema converts it.
    config = cfg.from_dict(yaml.safe_load("data: {dataset: digits}\nlaplace: {prior_precision: 1e-3}"))
    assert config.laplace.prior_precision == 0.001


@pytest.mark.parametrize("text, message", [
    ("laplace: [unclosed", "not valid YAML at line 1"),
    ("data: {dataset: digits}\nlaplace:\n  prior_precision: 1\n   bad: 2", "not valid YAML at line"),
    ("laplace: {prior_precision: 5}\ndata: {dataset: digits}\nlaplace: {hessian_structure: diag}",
     "not valid YAML at line 3: the key 'laplace' is given twice"),
])
def test_invalid_yaml_gives_the_line(tmp_path, text, message):
    from laplace_tf.shift_run import load_shift_config

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for load in (cfg.load_config, load_shift_config):
        with pytest.raises(ValueError, match=message):
            load(path)


@pytest.mark.parametrize("shift, message", [
    ("{ensemble: many}", "shift.ensemble: expected the number of networks"),
    ("{ensemble: 1.7}", "shift.ensemble: expected the number of networks"),
    ("{ensemble: -1}", "shift.ensemble: expected the number of networks"),
    ("{temperature: 0}", "shift.temperature: expected true or false; got 0"),
    ("{shifts: rotation}", "shift.shifts: expected a list, e.g. [rotation, noise]; got 'rotation'"),
    ("{reliability_at: 0}", "shift.reliability_at: expected a list, e.g. [0, 2]; got 0"),
    ("{variants: [{label: MAP}]}", "shift.variants: expected labels that name one predictor "
                                   "each (not a baseline's: MAP, MAP + temperature, ensemble of "
                                   "5); 'MAP' is taken"),
    ("{variants: [{label: LA}, {label: LA}]}", "'LA' is taken"),
    ("{variants: [{label: LA, model: {hidden: [4]}}]}",
     "shift.variants 'LA': 'model' is shared by every predictor"),
])
def test_shift_section_values_name_the_key(tmp_path, shift, message):
    from laplace_tf.shift_run import load_shift_config

    path = tmp_path / "shift.yaml"
    path.write_text(f"data: {{dataset: digits}}\nshift: {shift}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_shift_config(path)


def test_shift_ensemble_of_a_loaded_network_is_refused_and_off_by_default(tmp_path):
    from laplace_tf.shift_run import _ensemble_size, load_shift_config

    path = tmp_path / "shift.yaml"
    path.write_text("data: {dataset: digits}\nmodel: {path: model.keras}\n")
    config, section = load_shift_config(path)
    assert _ensemble_size(section["ensemble"], config) == 0
    with pytest.raises(ValueError, match="shift.ensemble: 3 members to train like the MAP "
                                         "network, but the MAP network is loaded from"):
        _ensemble_size(3, config)
    path.write_text("data: {dataset: digits}\n")
    assert _ensemble_size(load_shift_config(path)[1]["ensemble"], config.__class__()) == 5


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="--config: no such file 'nope.yaml'"):
        cfg.load_config("nope.yaml")


def test_every_key_has_its_own_flag_and_help():
    flags = [spec.flag for spec in cfg.FIELDS.values()]
    assert len(set(flags)) == len(flags)
    assert cfg.FIELDS["model.path"].flag == "--model"
    assert all(spec.metadata["help"] for spec in cfg.FIELDS.values())
