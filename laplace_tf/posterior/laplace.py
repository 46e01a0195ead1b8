"""``PosteriorLaplace``: a weight subset composed with a posterior structure.

The Laplace posterior over the flat weight vector ``theta`` of a subset of a trained Keras
model is ``N(theta_MAP, P^-1)`` with precision (docs/conventions.md)::

    P = s * H / T + diag(lambda)

``H`` is the curvature of the summed negative log-likelihood at the MAP (``la.curvature``),
``T`` the temperature, ``lambda`` the prior precision (scalar, per layer or per weight) and
``s`` rescales a regression curvature fitted with noise ``sigma_fit`` to the current
``sigma_noise``: ``s = (sigma_fit / sigma)^2`` for the GGN and the exact Hessian,
``(sigma_fit / sigma)^4`` for the empirical Fisher. Changing the prior, the temperature or a
scalar ``sigma_noise`` therefore never recomputes curvature. A per-output ``sigma_noise``
(``[K]``) changes by rescaling output ``k``'s rows and columns of ``H`` by ``s_k`` for
``subset_of_weights="last_layer"``; over all weights (GGN or exact Hessian), a fit with a
``[K]`` sigma_noise also stores the unit-noise curvature ``H_k`` of each output, and
``H(sigma) = sum_k H_k / sigma_k^2`` (:mod:`laplace_tf.posterior.output_noise`).

One class serves every (subset, structure) pair: ``subset_of_weights`` picks the weights
(``"all"``, ``"last_layer"`` or ``"subnetwork"``), ``hessian_structure`` picks a
:class:`~laplace_tf.posterior.structures.Structure`, and the curvature blocks are factored
block by block (:mod:`laplace_tf.blocks`). ``laplace_tf.Laplace`` (the predictive)
subclasses it.

Example:
    >>> import keras, numpy as np
    >>> keras.utils.set_random_seed(0)
    >>> model = keras.Sequential([keras.Input((2,), dtype="float64"),
    ...                           keras.layers.Dense(1, dtype="float64")])
    >>> x = np.random.default_rng(0).normal(size=(20, 2))
    >>> la = PosteriorLaplace(model, "regression", "all", "full", progress=False)
    >>> la.fit((x, x @ [1.0, -1.0]))
    >>> X = np.c_[x, np.ones(20)]          # a linear model: H = X^T X / sigma^2 exactly
    >>> np.allclose(la.posterior_precision.to_dense(), X.T @ X + np.eye(3))
    True
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from laplace_tf.arguments import choice, flag, positive_int, positive_int_or_none, positive_number
from laplace_tf.batches import DEFAULT_BATCH_SIZE, Batches
from laplace_tf.blocks import Covariance, Factor
from laplace_tf.console import show_progress
from laplace_tf.curvature import make_builder
from laplace_tf.curvature.base import CURVATURES, Curvature, fit_curvature
from laplace_tf.curvature.full import default_memory_limit
from laplace_tf.curvature.kron import KFAC_APPROXIMATIONS
from laplace_tf.curvature.last_layer import find_last_layer
from laplace_tf.curvature.lowrank import DEFAULT_RANK
from laplace_tf.curvature.memory import (
    MemoryEstimate,
    check_memory,
    estimate_memory,
    format_bytes,
)
from laplace_tf.inputs import InputCheck
from laplace_tf.likelihoods import LIKELIHOODS, get_likelihood
from laplace_tf.params import LogitModel, SubnetworkSubset, WeightSubset, leaf_layers, model_cache
from laplace_tf.posterior import io, marglik, output_noise
from laplace_tf.posterior.prior import (
    as_float_tensor,
    check_positive,
    per_block,
    prior_mean_tensor,
    prior_precision_tensor,
    prior_terms,
)
from laplace_tf.posterior.state import PosteriorState, Setting
from laplace_tf.posterior.structures import STRUCTURES, precision_operator

SUBSETS = ("all", "last_layer", "subnetwork")
ON_INDEFINITE = ("raise", "clip")
_OTHER_OUTPUTS_SCALE = 1000.0
"""How much larger (at least) the other outputs' sigma_noise is in the fit that isolates one
output's curvature (:meth:`PosteriorLaplace._fit_pieces`)."""
SETTINGS = (
    Setting("likelihood", "metadata", attribute_name="likelihood_name"),
    Setting("subset_of_weights", "metadata"),
    Setting("hessian_structure", "metadata"),
    Setting("curvature", "metadata", attribute_name="curvature_kind"),
    Setting("prior_precision", "array"),
    Setting("prior_mean", "array"),
    Setting("sigma_noise", "array"),
    Setting("temperature", "metadata"),
    Setting("last_layer_name", "metadata"),
    Setting("stochastic", "metadata"),
    Setting("seed", "metadata"),
    Setting("on_indefinite", "metadata"),
    Setting("batch_size", "metadata"),
    Setting("progress", None, when_absent=False),
    Setting("memory_limit_bytes", "metadata"),
    Setting("rank", "metadata", when_absent=None),
    Setting("n_context", "metadata", when_absent=None),
    Setting("subnetwork_indices", "array", when_absent=None),
    Setting("kfac_approximation", "metadata", when_absent="expand"),
)
"""The constructor arguments after ``model``, in order: ``save`` writes them and ``load``
rebuilds ``cls(model, **settings)`` from them. A new constructor argument adds one line here
(with ``when_absent=<its default>``, so files written before it still load)."""


class NotFittedError(ValueError):
    """Raised when a posterior quantity is asked for before :meth:`PosteriorLaplace.fit`."""


class _Fitted(NamedTuple):
    """What a fit set (all or nothing): see :meth:`PosteriorLaplace._require_fit`."""

    curvature: Curvature
    factors: list[Factor]
    block_ranges: list[tuple[int, int]]
    mean: tf.Tensor
    fingerprint: str












def stateless_seed(seed: int | None) -> tf.Tensor:
    """A ``[2]`` int32 stateless seed from an int in ``[0, (2**31 - 1)**2)`` (fresh entropy when
    ``None``): the int in base ``2**31 - 1``, so that distinct seeds give distinct draws."""
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31 - 1))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an integer or None; got {seed!r}.")
    base = 2**31 - 1
    if not 0 <= seed < base**2:
        raise ValueError(f"seed: expected an integer in [0, (2**31 - 1)**2); got {seed}.")
    return tf.constant([int(seed) % base, int(seed) // base % base], tf.int32)


def _draw(posterior, n_samples: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """``n_samples`` draws of ``posterior`` (a multivariate normal ``loc + scale z``), the
    numbers of ``posterior.sample(n_samples, seed=seed)``: the same standard normals
    ``z [n, P]``, scaled by one matrix product for all samples, where TensorFlow Probability
    applies the scale sample by sample (a dense scale is then read ``n`` times from memory:
    100 draws over the bench MLP's last layer, P = 2,570, took 250 ms against 11 ms).
    Compiled (a partial per posterior state, so many states draw no TensorFlow retracing
    warning): eager TensorFlow Probability costs milliseconds of Python per call."""
    loc = posterior.loc
    z = tf.random.stateless_normal(tf.stack([n_samples, tf.size(loc)]), seed, dtype=loc.dtype)
    return loc + tf.transpose(posterior.scale.matmul(z, adjoint_arg=True))


class PosteriorLaplace:
    """The Laplace posterior over a weight subset of a trained Keras model.

    Args:
        model: a trained, built Keras model (its current weights are the MAP).
        likelihood: ``"classification"``, ``"binary"``, ``"regression"`` or
            ``"heteroscedastic"`` (outputs ``[mean (K), log-variance (K)]``).
        subset_of_weights: ``"last_layer"``, ``"all"`` or ``"subnetwork"`` (the weights
            ``subnetwork_indices``, with ``hessian_structure="full"``; the others stay at the
            MAP: the posterior, its mean and samples are over those ``P_sub`` weights).
        hessian_structure: ``"kron"``, ``"full"``, ``"diag"``, ``"lowrank"`` (the top
            ``rank`` eigenpairs of the GGN or EF, :mod:`laplace_tf.curvature.lowrank`) or
            ``"gp"`` (functional Laplace: the GGN over ``n_context`` context examples, whose
            GLM predictive is a GP; :mod:`laplace_tf.curvature.gp`).
        curvature: ``"ggn"``, ``"ef"`` or ``"hessian"`` (exact; with ``subset_of_weights="all"``
            only for ``"full"``; not for ``"lowrank"``).
        prior_precision: ``lambda`` > 0: a scalar, one per layer, or one per weight (not for
            ``"kron"``).
        prior_mean: the prior mean, a scalar or one per weight.
        sigma_noise: regression noise (scalar or one per output); must be 1 otherwise.
        temperature: ``T`` > 0 (the curvature and the log-likelihood are divided by it).
        last_layer_name: the layer for ``"last_layer"`` (default: the last layer with weights).
        stochastic: Monte-Carlo Kronecker GGN (``"kron"`` with ``curvature="ggn"`` only).
        seed: seed of the Monte-Carlo curvature, of the low-rank sketch or of the choice of
            the ``"gp"`` context (None: 0).
        on_indefinite: ``"raise"`` a ValueError when the precision is not positive definite,
            or ``"clip"`` negative curvature eigenvalues at zero (with a warning). Applies to
            ``curvature="hessian"``; the GGN and EF are positive semi-definite by
            construction, so their round-off negatives are always clipped silently.
        batch_size: batch size for array data.
        progress: show progress bars (None: on a terminal or in a notebook, never in a log
            file; see :mod:`laplace_tf.console`).
        memory_limit_bytes: the most memory a fit may need: ``fit`` refuses (before any
            work) when :meth:`memory_estimate` exceeds it, and ``posterior_covariance`` a
            dense matrix above it. Default: a quarter of the available memory
            (:func:`~laplace_tf.curvature.full.default_memory_limit`).
        rank: ``"lowrank"`` only: the eigenpairs kept (default 100; at most ``P``). Only a
            scalar ``sigma_noise`` then.
        n_context: ``"gp"`` only: the number of context examples, chosen uniformly without
            replacement (seeded by ``seed``) from the training data; None: all of them. The
            evidence's data terms are sums over all the data. Only a scalar ``sigma_noise``.
        subnetwork_indices: for ``"subnetwork"``: integer indices into the flat vector of all
            trainable weights (``WeightSubset(model).flat_values()``), unique; sorted here
            (:mod:`laplace_tf.subnetwork` chooses them).
        kfac_approximation: for layers applied at several locations per example (sequences,
            feature maps): ``"expand"`` (K-FAC-expand) or ``"reduce"`` (K-FAC-reduce: inputs
            averaged and gradients summed over the locations first), Eschenhagen et al.
            2023; see :mod:`laplace_tf.curvature.kron`. ``"reduce"`` needs
            ``hessian_structure="kron"`` with ``subset_of_weights="all"``.

    Raises:
        ValueError, TypeError: for any invalid argument (the message lists the valid values).

    For laplace_tf's own modules (evidence and tuning in ``marglik.py``, files in ``io.py``),
    which use these instead of private attributes: :data:`SETTINGS` with :meth:`settings`,
    :meth:`state` and :meth:`restore`, :meth:`update`, :meth:`log_evidence`, :meth:`tuner`
    and :attr:`stores_output_curvatures`.
    """

    SETTINGS = SETTINGS

    def __init__(
        self,
        model: keras.Model,
        likelihood: str,
        subset_of_weights: str = "last_layer",
        hessian_structure: str = "kron",
        curvature: str = "ggn",
        prior_precision=1.0,
        prior_mean=0.0,
        sigma_noise=1.0,
        temperature: float = 1.0,
        last_layer_name: str | None = None,
        stochastic: bool = False,
        seed: int | None = None,
        on_indefinite: str = "raise",
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool | None = None,
        memory_limit_bytes: int | None = None,
        rank: int | None = None,
        n_context: int | None = None,
        subnetwork_indices=None,
        kfac_approximation: str = "expand",
    ):
        self.likelihood_name = choice(likelihood, "likelihood", LIKELIHOODS)
        self.likelihood = get_likelihood(likelihood)  # with sigma_noise below
        self.subset_of_weights = choice(subset_of_weights, "subset_of_weights", SUBSETS)
        self.hessian_structure = choice(hessian_structure, "hessian_structure", tuple(STRUCTURES))
        self.curvature_kind = choice(curvature, "curvature", CURVATURES)
        self.on_indefinite = choice(on_indefinite, "on_indefinite", ON_INDEFINITE)
        if curvature == "hessian" and hessian_structure != "full" and (
                subset_of_weights == "all" or hessian_structure == "lowrank"):
            raise ValueError(
                f"curvature: the exact 'hessian' over all weights is only available with "
                f"hessian_structure='full' (got {hessian_structure!r}); use curvature='ggn' or "
                "'ef' for 'kron'/'diag'/'lowrank', or subset_of_weights='last_layer'."
            )
        if rank is not None and hessian_structure != "lowrank":
            raise ValueError(
                f"rank: only used with hessian_structure='lowrank'; got hessian_structure="
                f"{hessian_structure!r}. Drop rank, or use hessian_structure='lowrank'."
            )
        self.rank = None if rank is None else positive_int(rank, "rank")
        if hessian_structure == "gp" and curvature != "ggn":
            raise ValueError(
                f"curvature: hessian_structure='gp' needs curvature='ggn' (the GP's kernel and "
                f"noise are the GGN's); got {curvature!r}."
            )
        self.n_context = positive_int_or_none(n_context, "n_context")
        if n_context is not None and hessian_structure != "gp":
            raise ValueError(
                f"n_context: only used with hessian_structure='gp'; got hessian_structure="
                f"{hessian_structure!r}. Drop n_context, or use hessian_structure='gp'."
            )
        self.stochastic = flag(stochastic, "stochastic")
        if stochastic and (hessian_structure != "kron" or curvature != "ggn"
                           or subset_of_weights != "all"):
            raise ValueError(
                "stochastic: the Monte-Carlo curvature exists for subset_of_weights='all', "
                "hessian_structure='kron' and curvature='ggn' only; got "
                f"{subset_of_weights!r} / {hessian_structure!r} / {curvature!r}. Set "
                "stochastic=False (a last-layer curvature is exact and cheap)."
            )
        self.kfac_approximation = choice(kfac_approximation, "kfac_approximation",
                                         KFAC_APPROXIMATIONS)
        if kfac_approximation != "expand" and (hessian_structure, subset_of_weights) != ("kron", "all"):
            raise ValueError(
                f"kfac_approximation: {kfac_approximation!r} exists for hessian_structure='kron' "
                f"with subset_of_weights='all' only; got {hessian_structure!r} / "
                f"{subset_of_weights!r}. Use kfac_approximation='expand'."
            )
        if seed is not None:
            stateless_seed(seed)
        self.seed = None if seed is None else int(seed)
        self.progress = show_progress(None if progress is None else flag(progress, "progress"))
        self.batch_size = positive_int(batch_size, "batch_size")
        self.memory_limit_bytes = positive_int_or_none(memory_limit_bytes, "memory_limit_bytes")
        if last_layer_name is not None and subset_of_weights != "last_layer":
            raise ValueError(
                "last_layer_name: only used with subset_of_weights='last_layer'; got "
                f"subset_of_weights={subset_of_weights!r}. Drop last_layer_name."
            )
        if (subnetwork_indices is None) == (subset_of_weights == "subnetwork"):
            raise ValueError(
                "subnetwork_indices: give them with subset_of_weights='subnetwork', and only "
                f"then; got subset_of_weights={subset_of_weights!r} and subnetwork_indices="
                f"{'None' if subnetwork_indices is None else 'indices'}."
            )
        if subset_of_weights == "subnetwork" and hessian_structure != "full":
            raise ValueError(
                "hessian_structure: subset_of_weights='subnetwork' takes 'full' (the dense "
                f"curvature over the chosen weights); got {hessian_structure!r}. Choose fewer "
                "weights if a dense matrix over them is too large."
            )
        self.structure = STRUCTURES[hessian_structure]
        self.model = model
        self.subset = WeightSubset(model)  # checks the model
        self.subnetwork_indices = None
        if subset_of_weights == "subnetwork":
            self.subset = SubnetworkSubset(model, subnetwork_indices)
            self.subnetwork_indices = self.subset.indices
        self.last_layer_name = None
        if subset_of_weights == "last_layer":
            layer = find_last_layer(model, last_layer_name)
            self.subset = WeightSubset(model, [layer])
            self.last_layer_name = layer.name
        self.logit_model = LogitModel(model, self.subset, self.likelihood)
        self._dtype = self.subset.dtype
        by_dtype = {tf.as_dtype(v.dtype).name: v.path for v in model.trainable_variables}
        if len(by_dtype) > 1:
            raise ValueError(
                f"model: its weights have several dtypes (e.g. {by_dtype}); laplace_tf needs "
                "one dtype for all of them. Build every layer in the same dtype (float32 or "
                "float64), or keep float32 weights with a mixed-precision policy."
            )
        if self._dtype not in (tf.float32, tf.float64):
            raise ValueError(
                f"model: its weights are {self._dtype.name}; laplace_tf computes in float32 or "
                "float64 (Cholesky factorisations, eigendecompositions). Keep the weights in "
                "float32 with a mixed-precision policy (keras.mixed_precision."
                "set_global_policy('mixed_float16') computes in float16 with float32 weights), "
                "or build the model in float32."
            )
        self._layer_ranges = [(s.offset, s.size) for s in self.subset.slices]
        self._temperature = positive_number(temperature, "temperature")
        self._prior = self._checked_prior(prior_precision)
        self._prior_mean = prior_mean_tensor(prior_mean, self.n_params, self._dtype)
        self._curvature: Curvature | None = None
        self._fit_sigma: np.ndarray | None = None
        self._pieces: list[Curvature] | None = None  # per-output unit-noise curvatures
        self._sigma = self._checked_sigma(sigma_noise)
        self._check_curvature_scale(self._sigma, self._temperature)
        self.likelihood = get_likelihood(likelihood, np.asarray(self._sigma))
        self._factors: list[Factor] | None = None
        self._mean: tf.Tensor | None = None
        self._block_ranges: list[tuple[int, int]] | None = None
        self._fingerprint: str | None = None
        self._cache: dict = {}
        self._tuners: dict = {}
        self.tuning_trace: dict | None = None

    # ------------------------------------------------------------------ checks and state
    def _checked_prior(self, value, name: str = "prior_precision") -> tf.Tensor:
        return prior_precision_tensor(
            value, [s.name for s in self.subset.slices], self.n_params,
            self.structure.prior_structures, self._dtype, name,
        )

    def _check_curvature_scale(self, sigma: tf.Tensor, temperature: float) -> None:
        """Refuse a ``temperature`` and ``sigma_noise`` whose curvature factor
        ``1 / (temperature sigma^2)`` is not a finite number of the model's dtype."""
        with np.errstate(over="ignore", divide="ignore"):
            scale = 1.0 / (temperature * np.asarray(sigma, np.float64) ** 2)
            finite = np.isfinite(scale.astype(self._dtype.as_numpy_dtype))
        if not np.all(finite):
            raise ValueError(
                f"temperature, sigma_noise: the curvature is scaled by 1 / (temperature * "
                f"sigma_noise^2) = {np.max(scale):.3g}, which overflows {self._dtype.name} "
                f"(temperature {temperature:g}, sigma_noise {np.asarray(sigma).tolist()}). Give "
                "a larger temperature or sigma_noise, or use a float64 model."
            )

    def _checked_sigma(self, value) -> tf.Tensor:
        """``sigma_noise`` as a tensor; refuses what would need a new curvature fit."""
        if not self.likelihood.has_noise:
            if isinstance(value, bool) or np.ndim(value) != 0 or float(value) != 1.0:
                raise ValueError(
                    f"sigma_noise: only used with likelihood='regression'; it must stay 1 for "
                    f"{self.likelihood_name!r}; got {value!r}."
                )
            return tf.constant(1.0, self._dtype)
        sigma = as_float_tensor(value, "sigma_noise", self._dtype)
        if sigma.shape.rank not in (0, 1):
            raise ValueError(
                f"sigma_noise: expected a scalar or one value per output; got shape "
                f"{sigma.shape.as_list()}."
            )
        check_positive(sigma, "sigma_noise", "Give positive noise standard deviations.")
        if sigma.shape.rank and not self.structure.per_output_noise:
            raise ValueError(
                f"sigma_noise: hessian_structure={self.hessian_structure!r} takes a scalar "
                f"sigma_noise (its curvature cannot be rebuilt per output); got "
                f"{np.asarray(sigma).tolist()}. Give one value, or use hessian_structure='full', "
                "'kron' or 'diag'."
            )
        fit = self._fit_sigma
        if self._per_output_change(sigma) and self.subset_of_weights != "last_layer" \
                and self._pieces is None:
            why = ("the empirical Fisher sum_n g_n g_n^T mixes the outputs' residuals "
                   "(cross terms k != l), so it cannot be rebuilt for another per-output sigma"
                   if self.curvature_kind == "ef" else
                   "the per-output curvatures H_k (H = sum_k H_k / sigma_k^2) are stored only by "
                   "a non-stochastic fit with a per-output sigma_noise (not by a scalar fit or a "
                   "loaded file)")
            assert fit is not None  # a per-output change is relative to a fit
            raise ValueError(
                f"sigma_noise: the curvature was fitted with sigma_noise={fit.tolist()}; only a "
                f"scalar sigma_noise can change without refitting (got "
                f"{np.asarray(sigma).tolist()}): over subset_of_weights="
                f"{self.subset_of_weights!r}, {why}. Build a new Laplace with the new "
                "sigma_noise and fit it, fit with curvature='ggn' and sigma_noise=[s] * K to "
                "change it per output later, or use subset_of_weights='last_layer'."
            )
        if fit is not None and sigma.shape.rank and fit.ndim and fit.shape != tuple(sigma.shape):
            raise ValueError(
                f"sigma_noise: expected {fit.shape[0]} values, one per output; got "
                f"{sigma.shape[0]}."
            )
        return sigma

    def _per_output_change(self, sigma: tf.Tensor) -> bool:
        """Whether ``sigma`` differs from the fit's noise in a way no scalar factor covers (a
        symbolic ``sigma``, inside a ``tf.function``, is taken to differ)."""
        fit = self._fit_sigma
        return fit is not None and bool(fit.ndim or sigma.shape.rank) and not (
            fit.shape == tuple(sigma.shape) and hasattr(sigma, "numpy")
            and np.array_equal(fit, sigma.numpy())
        )

    def _require_fit(self, what: str) -> _Fitted:
        """The fitted state, or a NotFittedError naming ``what`` was asked for."""
        if self._curvature is None or self._factors is None or self._block_ranges is None \
                or self._mean is None or self._fingerprint is None:
            raise NotFittedError(
                f"{what}: the posterior is not fitted yet; call la.fit(train_data) first."
            )
        return _Fitted(self._curvature, self._factors, self._block_ranges, self._mean,
                       self._fingerprint)

    def _multiplier(self, sigma: tf.Tensor | None = None, temperature: float | None = None,
                    fit_sigma: np.ndarray | None = None) -> tf.Tensor:
        """``c = s / T``: the factor of the stored curvature (fitted at ``fit_sigma``, default
        the stored one) in the precision at ``sigma`` and ``temperature`` (default: current)."""
        c = tf.constant(1.0 / (temperature or self._temperature), self._dtype)
        fit_sigma = self._fit_sigma if fit_sigma is None else fit_sigma
        sigma = self._sigma if sigma is None else sigma
        if fit_sigma is None or fit_sigma.ndim or sigma.shape.rank:
            return c  # not regression, or per-output (a rescaled curvature, output_noise)
        return c * (tf.constant(fit_sigma, self._dtype) / sigma) ** self._noise_power()

    def _noise_power(self) -> int:
        """``p``: the curvature fitted at noise ``s0`` is ``(s0 / s)^p`` times that at ``s``."""
        return self.likelihood.curvature_power(self.curvature_kind)

    def _block_priors(self, prior: tf.Tensor) -> list[tf.Tensor]:
        return per_block(prior, self._layer_ranges, self._require_fit("prior").block_ranges)

    def _check_positive_definite(self, factors, c, priors) -> None:
        """Raise a ValueError explaining why when ``c H + diag(prior)`` is not PD."""
        for factor, prior in zip(factors, priors, strict=True):
            bound = c * factor.min_curvature_eigenvalue + tf.reduce_min(prior)
            if float(bound) > 0:
                continue  # Weyl: every eigenvalue is at least the bound
            lowest = float(factor.smallest_precision_eigenvalue(c, prior))
            if lowest > 0:
                continue
            raise ValueError(
                f"The posterior precision H / temperature + prior_precision is not positive "
                f"definite: its smallest eigenvalue is {lowest:.3g}, because the curvature has "
                f"{factor.n_negative} negative eigenvalue(s) (most negative "
                f"{factor.most_negative:.3g}). This happens with curvature='hessian' at a "
                f"saddle point or with an under-trained model. Use curvature='ggn' (always "
                f"positive semi-definite), train the model to a minimum, raise "
                f"prior_precision, or pass on_indefinite='clip' to set negative curvature "
                f"eigenvalues to zero."
            )

    def _factorize(self, curvature: Curvature) -> list:
        # the GGN and the EF are positive semi-definite by construction: their negative
        # eigenvalues are round-off (float32 Kronecker factors) and are always clipped
        psd_by_construction = self.curvature_kind != "hessian"
        clip = psd_by_construction or self.on_indefinite == "clip"
        factors = [block.factorize(clip) for block in curvature.blocks]
        negative = sum(f.n_negative for f in factors)
        if negative and not psd_by_construction and clip:
            total = sum(f.n_eigenvalues for f in factors)
            lowest = min(f.most_negative for f in factors)
            kron = " (for Kronecker blocks: eigenvalues of the factors A and G)" \
                if self.hessian_structure == "kron" else ""
            warnings.warn(
                f"on_indefinite='clip': clipped {negative} of {total} curvature eigenvalues "
                f"at zero{kron}; the most negative was {lowest:.3g}. The curvature is not "
                "positive semi-definite (exact Hessian away from a minimum, or an "
                "under-trained model).", stacklevel=3,
            )
        return factors

    def _set(self, **state) -> None:
        """Commit new state (after every check passed) and drop cached derived objects.

        Compiled prior tuners take the prior and sigma_noise as inputs: they survive changes
        of those two only.
        """
        for key, value in state.items():
            setattr(self, f"_{key}", value)
        self._cache.clear()
        if set(state) - {"prior", "sigma"}:
            self._tuners.clear()

    def _cached(self, key: str, build):
        """``build()`` once per state, always eagerly (also when called while tracing)."""
        if key not in self._cache:
            with tf.init_scope():
                self._cache[key] = build()
        return self._cache[key]

    # ------------------------------------------------------------------ fitting
    def _builder(self, likelihood=None):
        """The curvature builder of this posterior's settings and ``likelihood`` (default: its
        own). Builders that keep no state between fits (not ``"lowrank"``, ``"gp"`` or
        ``stochastic``, whose random draws advance) are shared by the posteriors of one model,
        weight subset and settings (:func:`~laplace_tf.params.model_cache`), and with them
        their compiled step (:func:`~laplace_tf.curvature.base.fit_curvature`): a refit, or a
        second posterior, does not trace it again."""
        likelihood = likelihood or self.likelihood
        if self.stochastic or self.hessian_structure in ("lowrank", "gp"):
            return self._new_builder(likelihood)
        sigma = getattr(likelihood, "sigma_noise", None)
        shared = model_cache(self.model, (
            "builder", self.subset.layout_key(), self.subset_of_weights, self.hessian_structure,
            self.curvature_kind, self.kfac_approximation, self.memory_limit_bytes,
            likelihood.name, None if sigma is None else np.asarray(sigma, np.float64).tobytes(),
        ))
        if "builder" not in shared:
            shared["builder"] = self._new_builder(likelihood)
        return shared["builder"]

    def _new_builder(self, likelihood):
        options = {"memory_limit_bytes": self.memory_limit_bytes}
        if self.stochastic:
            options.update(stochastic=True, seed=self.seed)
        if self.hessian_structure == "lowrank":
            options.update(rank=self._rank, seed=self.seed)
        if self.hessian_structure == "gp":
            options.update(n_context=self.n_context, seed=self.seed)
        if self.kfac_approximation != "expand":
            options.update(kfac_approximation=self.kfac_approximation)
        return make_builder(
            self.subset_of_weights, self.hessian_structure, self.logit_model,
            likelihood, curvature=self.curvature_kind, **options,
        )

    def memory_estimate(self, n_outputs: int | None = None, batch_size: int | None = None,
                        n_context: int | None = None) -> MemoryEstimate:
        """The bytes this (subset, structure) needs to fit and use, before fitting.

        ``fit`` refuses when its total exceeds ``memory_limit_bytes``.

        Args:
            n_outputs: the number of model outputs; default: read from the model.
            batch_size: the fit's batch size (default: the constructor's).
            n_context: ``"gp"``: the number of context examples (default: the constructor's;
                needed for ``n_context=None``: the number of training examples).

        Example:
            ``print(ltf.Laplace(model, "classification", "all", "full").memory_estimate())``
        """
        if n_outputs is None:
            n_outputs = _n_outputs(self.model)
        return estimate_memory(
            self.subset, self.hessian_structure, n_outputs,
            self.batch_size if batch_size is None else batch_size, self._dtype,
            self.subset_of_weights, self.curvature_kind, rank=self._rank,
            n_context=n_context or self.n_context,
        )

    @property
    def _rank(self) -> int:
        """The low-rank structure's rank: ``rank`` (default 100) capped at ``P``."""
        return min(DEFAULT_RANK if self.rank is None else self.rank, self.n_params)

    def _check_memory(self, batch_size: int, n_examples: int | None) -> None:
        """Refuse a fit whose :meth:`memory_estimate` exceeds ``memory_limit_bytes``.

        A model whose number of outputs cannot be read (a subclassed model) is estimated with
        its last layer's outputs (the ``P x P`` parts, which dominate a dense structure, do
        not depend on them). A ``"gp"`` context of all the examples of a dataset (``n_examples``
        unknown until streamed) is checked by its builder instead, before its rows.
        """
        context = None
        if self.hessian_structure == "gp":
            context = min(filter(None, (self.n_context, n_examples)), default=None)
            if context is None:
                return
        try:
            n_outputs = _n_outputs(self.model)
        except ValueError:
            n_outputs = int(self.subset.slices[-1].variables[0].shape[-1])
        check_memory(self.memory_estimate(n_outputs, batch_size, context),
                     self.memory_limit_bytes, "memory_limit_bytes")

    def fit(self, data, override: bool = True, batch_size: int | None = None,
            progress: bool | None = None,
            strategy: tf.distribute.Strategy | None = None, steps: int | None = None,
            sample_weight=None) -> None:
        """Compute the curvature at the model's current weights (the MAP).

        Args:
            data: a ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, sample_weight)`` batches, or
                a tuple ``(x, y)`` or ``(x, y, sample_weight)`` of arrays. Datasets are
                streamed batch by batch. With a multi-worker strategy, each worker passes its
                own shard.
            override: ``True`` replaces the curvature; ``False`` adds this data to it (online
                update; the mean becomes the current weights). A ``"lowrank"`` curvature adds
                the new part's rank-``k`` root to the old one (the rank grows by ``k`` per
                update: the sum of the two approximations, not the top ``k`` of all the data),
                a ``"gp"`` one the new part's context examples.
            batch_size: batch size for arrays (default: the constructor's).
            progress: progress bar (default: the constructor's).
            strategy: a ``tf.distribute`` strategy: batches are split across its replicas and
                the curvature is all-reduced (default: the strategy whose scope is active).
            steps: use only the first ``steps`` batches (as Keras' ``steps_per_epoch``);
                required for an infinite dataset (``.repeat()`` without a count). With a
                ``[K]`` sigma_noise over all weights the data is read ``K + 1`` times (once
                more per output); the ``steps`` batches of a dataset are then kept in memory
                so that every pass reads the same examples.
            sample_weight: for a tuple ``(x, y)`` of arrays: one finite, non-negative weight
                per example ``[N]`` (or ``[N, 1]``), as in Keras' ``model.fit``. A weight
                counts as a number of copies of the example (2: given twice, 0: dropped): the
                NLL, the curvature and the data count of the evidence are weighted sums.

        Example:
            ``la.fit(train.repeat(), steps=100)``: the curvature of the first 100 batches.

        Raises:
            ValueError: :meth:`memory_estimate` exceeds ``memory_limit_bytes`` (before any
                work), bad data, an indefinite precision, ...; nothing changes then.
        """
        if sample_weight is not None:
            if not isinstance(data, (tuple, list)) or len(data) != 2:
                raise ValueError(
                    "sample_weight: only for data given as a tuple (x, y) of arrays; a dataset "
                    "yields (x, y, sample_weight) batches instead, a tuple (x, y, w) carries "
                    "its own."
                )
            data = (*data, sample_weight)
        flag(override, "override")
        batch_size = self.batch_size if batch_size is None else positive_int(batch_size, "batch_size")
        progress = self.progress if progress is None else flag(progress, "progress")
        steps = positive_int_or_none(steps, "steps")
        with_pieces = self._needs_pieces()
        if not override and self._curvature is not None and \
                with_pieces != (self._pieces is not None):
            raise ValueError(
                "override: an online update (override=False) needs the per-output curvatures "
                "of the first fit when sigma_noise is a [K] vector over all weights, and only "
                "then; this posterior " + (
                    "has none (fitted with a scalar sigma_noise, or loaded from a file, which "
                    "does not keep them)" if with_pieces else "was fitted with them (a [K] "
                    "sigma_noise)") + ". Refit with override=True instead."
            )
        if with_pieces and steps is not None and isinstance(data, tf.data.Dataset):
            data = data.take(steps).cache()  # each output's pass reads the same batches
        batches = Batches(data, batch_size, dtype=self._dtype, progress=progress,
                          description="curvature", steps=steps, check=InputCheck(self.model))
        self._check_memory(batch_size, len(data[1]) if isinstance(data, (tuple, list)) else None)
        curvature = fit_curvature(self._builder(), batches, strategy)
        pieces = self._fit_pieces(curvature, lambda: Batches(
            data, batch_size, dtype=self._dtype, progress=progress, description="curvature",
            steps=steps), strategy) if with_pieces else None
        if not override and self._curvature is not None:
            self.structure.check(curvature)
            if pieces is not None and self._pieces is not None:  # both or neither (above)
                pieces = [old + new for old, new in zip(self._pieces, pieces, strict=True)]
            curvature = self._curvature.scaled(self._multiplier() * self._temperature) + curvature
        fit_sigma = np.asarray(self._sigma, np.float64) if self.likelihood.has_noise else None
        self._install(curvature, self.subset.flat_values(), fit_sigma, self.subset.fingerprint())
        self._pieces = pieces

    def _needs_pieces(self) -> bool:
        """Whether a fit keeps each output's curvature (:meth:`_fit_pieces`): a ``[K]``
        sigma_noise over all weights, which may change later (GGN, exact Hessian)."""
        return not (self.subset_of_weights == "last_layer" or not self.likelihood.has_noise
                    or self._sigma.shape.rank == 0 or self.curvature_kind == "ef"
                    or self.stochastic)

    def _fit_pieces(self, curvature: Curvature, batches, strategy) -> list[Curvature]:
        """The unit-noise curvature ``H_k`` of each output (``H(sigma) = sum_k H_k / sigma_k^2``),
        from ``curvature = H(sigma)`` and one more fit per output, at ``sigma'`` = ``sigma``
        but ``sigma'_j = s sigma_j`` for the other outputs ``j``:
        ``H(sigma') = (1 - c) H_k / sigma_k^2 + c H(sigma)`` with ``c = 1 / s^2``, so ``H_k`` is
        ``sigma_k^2 (H(sigma') - c H(sigma)) / (1 - c)``. With ``s = 1000 max(1, sigma_k /
        min_j sigma_j)`` the other outputs weigh at most ``1e-6`` of output ``k`` in ``c H(sigma)``
        (per unit curvature), so float32 sums do not cancel (a difference of two nearly equal
        curvatures lost 2-3% at sigma ``[0.01, 10]``; a fixed ``s = 1000``, 14% at
        ``[1e-3, 1e3]``)."""
        sigma = np.asarray(self._sigma, np.float64)
        pieces = []
        for k, sigma_k in enumerate(sigma):
            scale = _OTHER_OUTPUTS_SCALE * max(1.0, sigma_k / sigma.min())
            c = scale**-2
            alone = np.where(np.arange(len(sigma)) == k, sigma, scale * sigma)
            builder = self._builder(get_likelihood(self.likelihood_name, alone))
            higher = fit_curvature(builder, batches(), strategy)
            weights = tf.constant([sigma_k**2 / (1 - c), -c * sigma_k**2 / (1 - c)], self._dtype)
            pieces.append(Curvature(curvature.structure, [
                output_noise.combined_block([h, b], weights)
                for h, b in zip(higher.blocks, curvature.blocks, strict=True)
            ], curvature.nll, curvature.n_data, curvature.residual_ss))
        return pieces

    def _install(self, curvature: Curvature, mean: tf.Tensor, fit_sigma: np.ndarray | None,
                 fingerprint: str) -> None:
        """Factor ``curvature`` (fitted at ``fit_sigma``), check it, and commit it."""
        self.structure.check(curvature)
        ranges, offset = [], 0
        for block in curvature.blocks:
            ranges.append((offset, block.size))
            offset += block.size
        if offset != self.n_params:
            raise ValueError(
                f"curvature: the blocks cover {offset} weights but the subset has "
                f"{self.n_params}; fit the curvature on this model's weight subset."
            )
        factors = self._factorize(curvature)
        c = self._multiplier(fit_sigma=fit_sigma)
        self._check_positive_definite(factors, c, per_block(self._prior, self._layer_ranges, ranges))
        self._set(curvature=curvature, factors=factors, block_ranges=ranges, mean=mean,
                  fit_sigma=fit_sigma, fingerprint=fingerprint)

    def update(self, prior=None, sigma=None, temperature=None) -> None:
        """Check a new prior precision, sigma_noise and/or temperature together, then commit
        them at once (or raise and change nothing). The property setters set one each."""
        prior = self._prior if prior is None else self._checked_prior(prior)
        sigma = self._sigma if sigma is None else self._checked_sigma(sigma)
        temperature = self._temperature if temperature is None else \
            positive_number(temperature, "temperature")
        self._check_curvature_scale(sigma, temperature)
        changed = dict(prior=prior, sigma=sigma)
        if self._curvature is not None:
            factors, fit_sigma = self._factors, self._fit_sigma
            if self._per_output_change(sigma):  # the curvature at the new sigma
                assert fit_sigma is not None  # a per-output change is relative to a fit
                if self._pieces is not None:
                    curvature = output_noise.from_pieces(self._pieces, sigma, self._curvature)
                else:
                    scales = output_noise.output_scales(fit_sigma, sigma, self._noise_power())
                    curvature = output_noise.rescaled(self._curvature, scales * tf.ones_like(sigma))
                factors = self._factorize(curvature)
                fit_sigma = np.asarray(sigma, np.float64) * np.ones(np.shape(fit_sigma))
                changed.update(curvature=curvature, factors=factors, fit_sigma=fit_sigma)
            self._check_positive_definite(
                factors, self._multiplier(sigma, temperature, fit_sigma), self._block_priors(prior)
            )
        if temperature != self._temperature:
            changed["temperature"] = temperature
        self._set(**changed)
        self.likelihood = get_likelihood(self.likelihood_name, np.asarray(sigma))

    # ------------------------------------------------------------------ settings and state
    def settings(self) -> dict:
        """The constructor arguments after ``model`` (:data:`SETTINGS`) with their current
        values: ``type(la)(la.model, **la.settings())`` is an unfitted copy of ``la``."""
        return {s.name: getattr(self, s.attribute) for s in self.SETTINGS}

    def state(self) -> PosteriorState:
        """What the fit computed (:class:`PosteriorState`); :meth:`restore` takes it back."""
        fitted = self._require_fit("state")
        return PosteriorState(fitted.curvature, fitted.mean, self._fit_sigma, fitted.fingerprint,
                              self.tuning_trace, self._pieces)

    def restore(self, state: PosteriorState) -> None:
        """Factor, check and commit a :class:`PosteriorState` (e.g. read from a file) as if
        fitted; raises (changing nothing) for a curvature that does not fit this posterior."""
        fit, sigma = state.fit_sigma, np.asarray(self._sigma, np.float64)
        if (fit is None) == self.likelihood.has_noise:
            raise ValueError(
                f"state: fitted for a likelihood {'without' if fit is None else 'with'} "
                f"sigma_noise, but this posterior's is {self.likelihood_name!r}; restore a "
                "state of the same likelihood.")
        if fit is not None and (np.ndim(fit) or sigma.ndim) and not (
                np.shape(fit) == sigma.shape and np.allclose(fit, sigma, rtol=1e-12)):
            raise ValueError(
                f"state: fitted at sigma_noise {np.asarray(fit).tolist()}, but this posterior "
                f"has sigma_noise {sigma.tolist()}; a per-output curvature holds at its own "
                "sigma only. Set sigma_noise to the state's first, or refit.")
        dtypes = {tf.as_dtype(part.dtype) for block in state.curvature.blocks
                  for part in tf.nest.flatten(block) if tf.is_tensor(part)
                  and part.dtype.is_floating}
        if dtypes - {self._dtype}:
            raise ValueError(
                f"state: its curvature is {sorted(d.name for d in dtypes)}, this posterior "
                f"{self._dtype.name}; restore a state of a model with the same dtype.")
        self._install(state.curvature, state.mean, state.fit_sigma, state.fingerprint)
        self._pieces = state.output_curvatures
        self.tuning_trace = state.tuning_trace

    def tuner(self, key, build):
        """``build()`` once per ``key``: a compiled tuning loop that takes the prior precision
        and sigma_noise as inputs; dropped whenever anything else it captures changes."""
        if key not in self._tuners:
            self._tuners[key] = build()
        return self._tuners[key]

    @property
    def stores_output_curvatures(self) -> bool:
        """Whether the fit stored each output's unit-noise curvature ``H_k``, so that a
        per-output sigma_noise over all weights can change (and be tuned) without a refit."""
        return self._pieces is not None

    # ------------------------------------------------------------------ properties
    @property
    def n_params(self) -> int:
        """Number of weights ``P`` in the posterior."""
        return self.subset.n_params

    @property
    def curvature(self) -> Curvature | None:
        """The fitted :class:`~laplace_tf.curvature.base.Curvature` (at the fit's sigma_noise)."""
        return self._curvature

    @property
    def mean(self) -> tf.Tensor:
        """The MAP weights ``[P]`` (flat) at the last fit."""
        self._require_fit("mean")
        return self._mean

    @property
    def prior_precision(self) -> tf.Tensor:
        """``lambda``: ``[]``, ``[L]`` (per layer) or ``[P]`` (per weight)."""
        return self._prior

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        self.update(prior=_given(value, "prior_precision"))

    @property
    def prior_mean(self) -> tf.Tensor:
        """The prior mean, ``[]`` or ``[P]``."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value) -> None:
        self._set(prior_mean=prior_mean_tensor(value, self.n_params, self._dtype))

    @property
    def sigma_noise(self) -> tf.Tensor:
        """Regression noise standard deviation (``[]`` or ``[K]``); 1 for other likelihoods."""
        return self._sigma

    @sigma_noise.setter
    def sigma_noise(self, value) -> None:
        self.update(sigma=_given(value, "sigma_noise"))

    @property
    def temperature(self) -> float:
        """``T``: the curvature and the log-likelihood are divided by it."""
        return self._temperature

    @temperature.setter
    def temperature(self, value) -> None:
        self.update(temperature=_given(value, "temperature"))

    # ------------------------------------------------------------------ the posterior
    def block_slices(self) -> list[tuple[int, int]]:
        """``(offset, size)`` of each curvature block in the flat weight vector."""
        return list(self._require_fit("block_slices").block_ranges)

    def block_kinds(self) -> dict[str, str]:
        """``{layer name: kind}``: the kind of curvature block each layer's weights are in,
        the block type's name (``"kron"`` for ``A ⊗ G``, ``"dense"``, ``"diag"``, ...). In a
        Kronecker fit ``"diag"`` is the exact-diagonal fallback (the fit's log says why), and
        ``"dense"`` the exact block of a scale-and-shift layer (LayerNormalization,
        BatchNormalization); a full fit's one block is ``"dense"`` for every layer. Layers of
        the same name (in nested models, the two cells of a Bidirectional layer) are told
        apart as ``"name"``, ``"name#2"``, ... in the model's weight order.
        """
        fitted = self._require_fit("block_kinds")
        kinds: dict[str, str] = {}
        layers: dict[str, object] = {}  # key -> the layer holding it
        for s in self.subset.slices:
            index = next(i for i, (offset, size) in enumerate(fitted.block_ranges)
                         if offset <= s.offset < offset + size)
            key, count = s.name, 1
            while layers.setdefault(key, s.layer) is not s.layer:
                count += 1
                key = f"{s.name}#{count}"
            name = type(fitted.curvature.blocks[index]).__name__.removesuffix("Block")
            kinds[key] = name.removeprefix("Permuted").lower()  # a transposed conv's: "kron"
        return kinds

    def covariance_blocks(self) -> list[Covariance]:
        """The covariance, block by block (aligned with :meth:`block_slices`).

        Each entry is the covariance of its block type (:mod:`laplace_tf.blocks`), e.g. a
        :class:`~laplace_tf.blocks.dense.DenseCovariance`,
        :class:`~laplace_tf.blocks.kron.KronCovariance` or
        :class:`~laplace_tf.blocks.diag.DiagCovariance`.
        """
        factors = self._require_fit("covariance_blocks").factors
        c, priors = self._multiplier(), self._block_priors(self._prior)
        return self._cached("covariance_blocks", lambda: [
            f.covariance(c, p) for f, p in zip(factors, priors, strict=True)
        ])

    @property
    def posterior_precision(self) -> tf.linalg.LinearOperator:
        """``s H / T + diag(lambda)`` as a (block-diagonal, structured) LinearOperator."""
        factors = self._require_fit("posterior_precision").factors
        return self._cached("precision", lambda: precision_operator(
            factors, self._multiplier(), self._block_priors(self._prior)
        ))

    @property
    def posterior(self):
        """The posterior over the flat weights, a ``tfp.distributions`` multivariate normal."""
        fitted = self._require_fit("posterior")
        return self._cached("posterior", lambda: self.structure.distribution(
            fitted.mean, fitted.factors, self._multiplier(), self._block_priors(self._prior)
        ))

    @property
    def posterior_covariance(self) -> tf.Tensor:
        """The dense covariance ``[P, P]``; refused above ``memory_limit_bytes``."""
        self._require_fit("posterior_covariance")
        limit = self.memory_limit_bytes or default_memory_limit()
        n_bytes = self.n_params**2 * self._dtype.size
        if n_bytes > limit:
            raise ValueError(
                f"posterior_covariance: a dense {self.n_params} x {self.n_params} matrix needs "
                f"{format_bytes(n_bytes)}, above the limit of {format_bytes(limit)} "
                f"(memory_limit_bytes). Use la.covariance_blocks() (structured), la.sample(), "
                f"or la.posterior.stddev() instead."
            )
        blocks = [tf.linalg.LinearOperatorFullMatrix(tf.cast(b.to_dense(), self._dtype))
                  for b in self.covariance_blocks()]
        return blocks[0].to_dense() if len(blocks) == 1 else \
            tf.linalg.LinearOperatorBlockDiag(blocks).to_dense()

    def sample(self, n_samples: int, seed: int | None = None) -> tf.Tensor:
        """``n_samples`` weight vectors ``[n, P]`` from the posterior (stateless: same seed,
        same numbers)."""
        n_samples = positive_int(n_samples, "n_samples")
        seed = stateless_seed(seed)
        self._require_fit("sample")
        return self._draws(n_samples, seed)

    def _draws(self, n_samples: int, seed: tf.Tensor) -> tf.Tensor:
        """:meth:`sample` with a stateless ``seed`` tensor, compiled once per posterior state;
        refused when the draws (``n_samples x P`` numbers, twice) exceed the memory limit."""
        limit = self.memory_limit_bytes or default_memory_limit()
        n_bytes = 2 * n_samples * self.n_params * self._dtype.size
        if n_bytes > limit:
            raise ValueError(
                f"n_samples: {n_samples} draws of {self.n_params} weights need "
                f"{format_bytes(n_bytes)}, above the limit of {format_bytes(limit)} "
                "(memory_limit_bytes); draw fewer samples, in several calls with other seeds."
            )
        draw = self._cached("draw", lambda: tf.function(functools.partial(_draw, self.posterior),
                                                        autograph=False))
        return draw(tf.constant(n_samples), seed)

    # ------------------------------------------------------------------ evidence and tuning
    def _data_nll(self, sigma: tf.Tensor) -> tf.Tensor:
        """Summed NLL at the MAP; for regression recomputed for ``sigma`` from the residuals
        (:meth:`~laplace_tf.likelihoods.Likelihood.data_nll`)."""
        curvature = self._require_fit("log_evidence").curvature
        statistics = curvature.residual_ss
        return self.likelihood.data_nll(
            tf.cast(curvature.nll, self._dtype),
            None if statistics is None else tf.cast(statistics, self._dtype),
            curvature.n_data, sigma,
        )

    def log_evidence(self, prior: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
        """The evidence at ``prior`` and ``sigma`` (pure TensorFlow, no checks; for compiled
        loops such as ``marglik``'s: :meth:`log_marginal_likelihood` checks its arguments)."""
        fitted = self._require_fit("log_evidence")
        sizes = [size for _, size in self._layer_ranges]
        squares = self._cached("squares", lambda: tf.square(fitted.mean - self._prior_mean))
        layer_squares = self._cached("layer_squares", lambda: tf.stack(
            [tf.reduce_sum(part) for part in tf.split(squares, sizes)]
        ))
        scatter, log_det_prior = prior_terms(prior, sizes, squares, layer_squares)
        fit = self._fit_sigma
        if fit is not None and (fit.ndim or sigma.shape.rank) and (
            self.subset_of_weights == "last_layer" or self._pieces is not None
        ):  # a per-output noise: the blocks at sigma and their log-determinants, in TensorFlow
            if self._pieces is not None:
                blocks = output_noise.from_pieces(self._pieces, sigma, fitted.curvature).blocks
            else:
                scales = output_noise.output_scales(fit, sigma, self._noise_power())
                blocks = output_noise.rescaled(
                    fitted.curvature, scales * tf.ones_like(fitted.curvature.residual_ss)).blocks
            # clipped as _factorize clips an indefinite exact Hessian (a GGN's round-off
            # negatives, which _factorize clips too, are far below the prior here)
            clip = self.curvature_kind == "hessian" and self.on_indefinite == "clip"
            log_det = tf.add_n([
                b.log_det_precision(1.0 / self._temperature, p, clip)
                for b, p in zip(blocks, self._block_priors(prior), strict=True)
            ])
            return (-self._data_nll(sigma) / self._temperature - 0.5 * scatter
                    + 0.5 * log_det_prior - 0.5 * log_det)
        return marglik.laplace_evidence(
            log_likelihood=-self._data_nll(sigma) / self._temperature,
            factors=fitted.factors,
            c=self._multiplier(sigma),
            block_priors=self._block_priors(prior),
            scatter=scatter,
            log_det_prior=log_det_prior,
        )

    def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None) -> tf.Tensor:
        """The Laplace approximation of the log evidence, a differentiable scalar.

        ``log p(D) ~ log p(D | theta*) / T - 1/2 sum lambda (theta* - mu0)^2
        + 1/2 log det diag(lambda) - 1/2 log det P``.

        Args:
            prior_precision: evaluate at this prior (default: ``la.prior_precision``); a
                tensor or variable here keeps gradients. The stored prior is not changed.
            sigma_noise: regression only: evaluate at this noise (default: ``la.sigma_noise``).

        Example:
            ``with tf.GradientTape() as tape: z = la.log_marginal_likelihood(lam)`` then
            ``tape.gradient(z, lam)``.
        """
        fitted = self._require_fit("log_marginal_likelihood")
        prior = self._prior if prior_precision is None else self._checked_prior(prior_precision)
        if sigma_noise is None:
            sigma = self._sigma
        else:
            sigma = self._checked_sigma(sigma_noise)
        if tf.executing_eagerly():
            if sigma_noise is not None:  # as the setter checks it
                self._check_curvature_scale(sigma, self._temperature)
            self._check_positive_definite(fitted.factors, self._multiplier(sigma),
                                          self._block_priors(prior))
        return self.log_evidence(prior, sigma)

    def optimize_prior_precision(
        self,
        method: str | None = None,
        prior_structure: str = "scalar",
        n_steps: int = 100,
        lr: float = 0.1,
        val_data=None,
        grid=None,
        pred_type: str = "glm",
        link_approx: str = "probit",
        tune_sigma_noise: bool | None = None,
        progress: bool | None = None,
        seed: int | None = None,
        n_samples: int = 100,
    ) -> dict:
        """Tune the prior precision (and, for regression, ``sigma_noise``): by the validation
        NLL when ``val_data`` is given, else by the evidence, unless ``method`` says; see
        :func:`laplace_tf.posterior.marglik.optimize_prior_precision`."""
        self._require_fit("optimize_prior_precision")
        return marglik.optimize_prior_precision(
            self, method=method, prior_structure=prior_structure, n_steps=n_steps, lr=lr,
            val_data=val_data, grid=grid, pred_type=pred_type, link_approx=link_approx,
            tune_sigma_noise=tune_sigma_noise,
            progress=self.progress if progress is None else flag(progress, "progress"),
            seed=seed, n_samples=n_samples,
        )

    # ------------------------------------------------------------------ save / load
    def save(self, path) -> None:
        """Write the posterior to one ``.npz`` file (numbers + JSON metadata, no pickle)."""
        self._require_fit("save")
        io.save(self, path)

    @classmethod
    def load(cls, path, model: keras.Model) -> PosteriorLaplace:
        """Read a posterior written by :meth:`save` for ``model`` (checked to match)."""
        return io.load(cls, path, model)


def _n_outputs(model) -> int:
    """The number of model outputs, from Keras' records or the last layer with weights."""
    outputs = getattr(model, "outputs", None)
    if outputs and (len(outputs) > 1 or len(outputs[0].shape) != 2):
        raise ValueError(
            f"model: laplace_tf needs a model with one output tensor [N, K]; this one has "
            f"{len(outputs)} output(s) of shape(s) {[tuple(o.shape) for o in outputs]}. Wrap "
            "the model so that it returns one tensor of K logits (or means) per input."
        )
    if outputs and outputs[0].shape[-1] is not None:
        return int(outputs[0].shape[-1])
    units = getattr(leaf_layers(model)[-1], "units", None)
    if units is None:
        raise ValueError(
            "n_outputs: cannot read the number of outputs from this model; pass "
            "memory_estimate(n_outputs=K)."
        )
    return int(units)


def _given(value, name: str):
    """``value``, refused if None (``update`` reads None as "unchanged")."""
    if value is None:
        raise TypeError(f"{name}: expected a positive value; got None (None does not reset it).")
    return value
