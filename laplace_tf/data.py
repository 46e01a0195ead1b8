"""Small data sets for the demo, the notebooks and the tests, and ``(x, y)`` arrays from files.

Every built-in set is embedded in scikit-learn or generated, so nothing is downloaded. Each
returns a :class:`DataSet` of numpy arrays: inputs ``x`` float (``dtype``, default float32),
targets ``y`` int64 class labels ``[N]`` (classification, binary) or float ``[N, 1]``
(regression), split into train / validation / test with ``seed``.

=================  ==============  ==========================================================
name               likelihood      what
=================  ==============  ==========================================================
``digits``         classification  scikit-learn 8x8 digits, 10 classes, pixels scaled to [0, 1]
``breast_cancer``  binary          scikit-learn breast cancer, 30 standardised features
``sine_1d``        regression      ``y = sin(3 x) + N(0, 0.3^2)``, ``x`` in three clusters
``diabetes``       regression      scikit-learn diabetes, 10 features, standardised target
=================  ==============  ==========================================================

Out-of-distribution sets (:data:`OOD_SETS`), both made from the digits test split and keeping
its labels (the original digits): ``digits_rotated`` rotates every image by 90 degrees
counter-clockwise (near OOD: a plain network is about as confident on them as on real digits);
``digits_noisy`` adds Gaussian pixel noise of standard deviation :data:`OOD_NOISE` and clips to
[0, 1] (far OOD).

Example:
    >>> ds = load("digits", seed=0)
    >>> ds.likelihood, ds.input_shape, ds.n_outputs, len(ds.train) + len(ds.val) + len(ds.test)
    ('classification', (64,), 10, 1797)
    >>> float(ds.train.x.min()), float(ds.train.x.max())
    (0.0, 1.0)
"""

from __future__ import annotations

import csv
import difflib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn import datasets as _sklearn
from sklearn.model_selection import train_test_split

from laplace_tf.likelihoods import get_likelihood

VAL_FRACTION = 0.2
TEST_FRACTION = 0.2
SINE_CLUSTERS = ((-2.5, -1.5), (-0.5, 0.5), (1.5, 2.5))
"""Input intervals of ``sine_1d``: the gaps between them show the uncertainty growing."""
SINE_NOISE = 0.3
LIKELIHOOD_OF = {"digits": "classification", "breast_cancer": "binary", "sine_1d": "regression",
                 "diabetes": "regression"}
"""The likelihood that fits each built-in data set's targets."""
OOD_NOISE = 0.5


@dataclass(frozen=True)
class Split:
    """Inputs ``x [N, ...]`` and targets ``y [N]`` or ``[N, K]``."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DataSet:
    """A named data set split three ways, with the likelihood that fits its targets."""

    name: str
    likelihood: str
    train: Split
    val: Split
    test: Split

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def n_outputs(self) -> int:
        """Network outputs: classes for classification, 1 for binary, target width otherwise."""
        y = np.concatenate([s.y.reshape(len(s.y), -1) for s in (self.train, self.val, self.test)])
        return get_likelihood(self.likelihood).n_outputs(y)


def _split(x: np.ndarray, y: np.ndarray, seed: int, stratify: bool) -> tuple[Split, Split, Split]:
    """Train / val / test with :data:`VAL_FRACTION` and :data:`TEST_FRACTION` of the rows."""
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y if stratify else None
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=VAL_FRACTION / (1 - TEST_FRACTION), random_state=seed,
        stratify=y_rest if stratify else None,
    )
    return Split(x_train, y_train), Split(x_val, y_val), Split(x_test, y_test)


def _standardised(parts: tuple[Split, Split, Split], x: bool, y: bool) -> tuple[Split, ...]:
    """Scale inputs and/or targets by the mean and standard deviation of the training split."""
    train = parts[0]
    x_mean, x_std = train.x.mean(axis=0), train.x.std(axis=0)
    y_mean, y_std = train.y.mean(axis=0), train.y.std(axis=0)
    return tuple(
        Split((s.x - x_mean) / x_std if x else s.x, (s.y - y_mean) / y_std if y else s.y)
        for s in parts
    )


def _cast(name: str, parts: tuple[Split, ...], dtype: str) -> DataSet:
    likelihood = LIKELIHOOD_OF[name]
    label_dtype = np.float64 if get_likelihood(likelihood).gaussian_predictive else np.int64
    train, val, test = (Split(s.x.astype(dtype), s.y.astype(label_dtype)) for s in parts)
    return DataSet(name, likelihood, train, val, test)


def digits(seed: int = 0, dtype: str = "float32") -> DataSet:
    """scikit-learn's 8x8 digits as flat ``[N, 64]`` inputs in [0, 1]; stratified splits."""
    raw = _sklearn.load_digits()
    return _cast("digits", _split(raw.data / 16.0, raw.target, seed, True), dtype)


def digits_rotated(seed: int = 0, dtype: str = "float32") -> Split:
    """Out-of-distribution digits: the test split of :func:`digits`, each image rotated 90 deg.

    Example:
        >>> ood, test = digits_rotated(seed=0), digits(seed=0).test
        >>> bool(np.array_equal(ood.x[0].reshape(8, 8), np.rot90(test.x[0].reshape(8, 8))))
        True
    """
    test = digits(seed, dtype).test
    images = np.rot90(test.x.reshape(-1, 8, 8), k=1, axes=(1, 2))
    return Split(np.ascontiguousarray(images.reshape(-1, 64)), test.y)


def digits_noisy(seed: int = 0, dtype: str = "float32") -> Split:
    """Out-of-distribution digits: the test split of :func:`digits` plus pixel noise.

    Gaussian noise of standard deviation :data:`OOD_NOISE` (drawn from ``seed``) is added to
    every pixel, then the pixels are clipped to [0, 1].

    Example:
        >>> ood = digits_noisy(seed=0)
        >>> ood.x.shape, float(ood.x.min()), float(ood.x.max())
        ((360, 64), 0.0, 1.0)
    """
    test = digits(seed, dtype).test
    noise = OOD_NOISE * np.random.default_rng(seed).normal(size=test.x.shape)
    return Split(np.clip(test.x + noise, 0.0, 1.0).astype(dtype), test.y)


def breast_cancer(seed: int = 0, dtype: str = "float32") -> DataSet:
    """scikit-learn's breast cancer (binary: 1 = benign), features standardised on train."""
    raw = _sklearn.load_breast_cancer()
    parts = _standardised(_split(raw.data, raw.target, seed, True), x=True, y=False)
    return _cast("breast_cancer", parts, dtype)


def diabetes(seed: int = 0, dtype: str = "float32") -> DataSet:
    """scikit-learn's diabetes regression; inputs and target ``[N, 1]`` standardised on train."""
    raw = _sklearn.load_diabetes()
    parts = _standardised(_split(raw.data, raw.target[:, None], seed, False), x=True, y=True)
    return _cast("diabetes", parts, dtype)


def sine_1d(seed: int = 0, n: int = 300, dtype: str = "float32") -> DataSet:
    """``y = sin(3 x) + noise`` (std :data:`SINE_NOISE`), ``x`` uniform in :data:`SINE_CLUSTERS`.

    ``n`` points are drawn, each in a cluster chosen at random, and split train / val / test.

    Example:
        >>> ds = sine_1d(seed=0)
        >>> ds.train.x.shape[1], ds.train.y.shape[1], ds.likelihood
        (1, 1, 'regression')
    """
    rng = np.random.default_rng(seed)
    lows, highs = np.array(SINE_CLUSTERS).T
    cluster = rng.integers(0, len(SINE_CLUSTERS), size=n)
    x = rng.uniform(lows[cluster], highs[cluster])[:, None]
    y = np.sin(3.0 * x) + SINE_NOISE * rng.normal(size=x.shape)
    return _cast("sine_1d", _split(x, y, seed, False), dtype)


DATASETS: dict[str, Callable[..., DataSet]] = {
    "digits": digits,
    "breast_cancer": breast_cancer,
    "sine_1d": sine_1d,
    "diabetes": diabetes,
}
OOD_SETS: dict[str, Callable[..., Split]] = {
    "digits_rotated": digits_rotated,
    "digits_noisy": digits_noisy,
}
OOD_OF = {"digits_rotated": "digits", "digits_noisy": "digits"}
"""The built-in data set each out-of-distribution set is made from."""


def _lookup(name: str, table: dict, argument: str):
    if name not in table:
        close = difflib.get_close_matches(str(name), table, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"{argument}: unknown built-in data set {name!r}{hint}; expected one of "
            f"{', '.join(table)}."
        )
    return table[name]


def load(name: str, seed: int = 0, dtype: str = "float32") -> DataSet:
    """The built-in data set ``name`` (one of :data:`DATASETS`)."""
    return _lookup(name, DATASETS, "dataset")(seed=seed, dtype=dtype)


def load_ood(name: str, seed: int = 0, dtype: str = "float32") -> Split:
    """The built-in out-of-distribution set ``name`` (one of :data:`OOD_SETS`)."""
    return _lookup(name, OOD_SETS, "ood")(seed=seed, dtype=dtype)


def _read_npz(path: Path, argument: str) -> tuple[np.ndarray, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{argument}: {path} is not a readable .npz file (not a zip archive); "
                         "save arrays with np.savez(path, x=x, y=y).")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            contents = {name: arrays[name] for name in arrays.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, AttributeError) as err:
        raise ValueError(f"{argument}: {path} is not a readable .npz file ({err})") from None
    if not {"x", "y"} <= set(contents):
        raise ValueError(
            f"{argument}: {path} holds arrays {sorted(contents)}; expected 'x' (inputs) and "
            "'y' (targets). Save with np.savez(path, x=x, y=y)."
        )
    return contents["x"], contents["y"]


def _read_csv(path: Path, target_column: int, argument: str) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if rows and not _numeric_row(rows[0]):
        rows = rows[1:]  # a header line
    if not rows:
        raise ValueError(f"{argument}: {path} holds no data rows.")
    widths = {len(row) for row in rows}
    if len(widths) != 1:
        raise ValueError(f"{argument}: {path} has rows of different lengths {sorted(widths)}.")
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{argument}: {path} has a non-numeric value ({err}).") from None
    width = table.shape[1]
    if width < 2 or not -width <= target_column < width:
        raise ValueError(
            f"target_column: {target_column} is not a column of {path}, which has {width} "
            "columns; give the index of the target column (e.g. -1 for the last)."
        )
    target = target_column % width
    return np.delete(table, target, axis=1), table[:, target]


def _numeric_row(row: list[str]) -> bool:
    try:
        [float(value) for value in row]
    except ValueError:
        return False
    return True


def load_arrays(path: str | Path, target_column: int = -1, argument: str = "data") -> Split:
    """``(x, y)`` from a ``.npz`` file (arrays ``x`` and ``y``) or a ``.csv`` file.

    A CSV file holds one example a row, numbers only apart from an optional header line; the
    column ``target_column`` is ``y`` and the others are ``x``.

    Args:
        path: the file.
        target_column: the CSV column holding the target (ignored for ``.npz``).
        argument: the name used in error messages (e.g. ``"data.test"``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unknown suffix, missing arrays, ragged or non-numeric rows, NaN or
            infinite values, or ``x`` and ``y`` of different lengths.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "d.csv")
        >>> _ = open(path, "w").write("a,b,label\\n1,2,0\\n3,4,1\\n")
        >>> split = load_arrays(path)
        >>> split.x.tolist(), split.y.tolist()
        ([[1.0, 2.0], [3.0, 4.0]], [0.0, 1.0])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: no such file {str(path)!r}.")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y = _read_npz(path, argument)
    elif suffix == ".csv":
        x, y = _read_csv(path, target_column, argument)
    else:
        raise ValueError(
            f"{argument}: {path} has suffix {suffix!r}; expected a .npz file (arrays x, y) or "
            "a .csv file."
        )
    if len(x) != len(y):
        raise ValueError(f"{argument}: {path} has {len(x)} inputs but {len(y)} targets.")
    for name, values in (("inputs", x), ("targets", y)):
        if np.issubdtype(values.dtype, np.number) and not np.all(np.isfinite(values)):
            raise ValueError(f"{argument}: {path} has NaN or infinite {name} (first at row "
                             f"{int(np.argwhere(~np.isfinite(values))[0][0])}); expected finite "
                             "numbers. Remove or impute those rows.")
    return Split(x, y)
