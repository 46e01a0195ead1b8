"""``Laplace``: a fitted weight posterior that predicts with uncertainty.

Two predictives, named as in laplace-torch:

* ``pred_type="glm"`` (linearised): the network linearised at the MAP ``theta*`` gives, per
  input, logits ``f ~ N(f(x; theta*), J Sigma J^T)``. The covariance is computed block by
  block from the posterior's covariance blocks (:mod:`laplace_tf.predictive.jacobians`), then
  a link approximation turns it into probabilities (:mod:`laplace_tf.predictive.links`);
  regression is Gaussian in closed form (the likelihood's ``glm_predictive``).
* ``pred_type="nn"`` (sampling): ``n_samples`` weight vectors drawn from the posterior, the
  network run with each of them (statelessly, a few samples at a time), the
  probabilities averaged; for regression the mean and variance of the sampled outputs
  (the likelihood's ``sampled_predictive``).

Inputs of any length are processed in batches of ``batch_size`` by compiled per-batch
functions (traced once per batch shape). Random numbers are stateless: the same ``seed``
gives the same numbers; ``seed=None`` draws a fresh one.

Example:
    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    >>> x, y = np.random.default_rng(0).normal(size=(20, 2)), np.arange(20) % 3
    >>> la = Laplace(model, "classification", subset_of_weights="last_layer",
    ...              hessian_structure="kron", prior_precision=1e8, progress=False)
    >>> la.fit((x, y))
    >>> probs = la(x[:5])          # probit GLM predictive [5, 3]; this strong a prior leaves
    >>> bool(np.allclose(probs, la.map_predict(x[:5]), atol=1e-4))    # the MAP's softmax
    True
"""

from __future__ import annotations

import functools
import numbers
import statistics

import numpy as np
import tensorflow as tf

from laplace_tf.arguments import choice, positive_int
from laplace_tf.batches import iterate_inputs
from laplace_tf.blocks import NotPositiveDefiniteError
from laplace_tf.curvature.kron_layers import input_rows
from laplace_tf.curvature.last_layer import last_layer_features
from laplace_tf.inputs import MODEL_ERRORS, InputCheck, explain_grouped_convolution
from laplace_tf.params import compiled_per_shape, model_cache
from laplace_tf.posterior import PosteriorLaplace
from laplace_tf.posterior.laplace import stateless_seed
from laplace_tf.predictive import export as _export
from laplace_tf.predictive.jacobians import FunctionalVariance
from laplace_tf.predictive.links import (
    PRED_TYPES,
    bridge,
    gaussian_samples,
    needs_full_covariance,
)

DEFAULT_BATCH_SIZE = 256
SAMPLES_IN_FLIGHT = 4
"""Weight samples the ``nn`` predictive runs concurrently."""

class Laplace(PosteriorLaplace):
    """Post-hoc Laplace approximation of a Keras model, with predictive uncertainty.

    Construct and fit as :class:`~laplace_tf.posterior.PosteriorLaplace` (same arguments);
    then ``la(x)`` predicts, ``la.functional_variance(x)`` gives ``J Sigma J^T``,
    ``la.predictive_samples(x)`` sampled outputs and ``la.map_predict(x)`` the plain network.
    See the module docstring for the two predictives.
    """

    def __call__(
        self,
        x,
        pred_type: str = "glm",
        link_approx: str = "probit",
        n_samples: int = 100,
        seed: int | None = None,
        batch_size: int | None = None,
    ):
        """The posterior predictive at inputs ``x``.

        The posterior's weights are its mean and samples; every other weight of the model (the
        layers below a last-layer or subnetwork posterior, and non-trainable statistics such
        as BatchNormalization's) is read from the model at each call: after changing those
        (training on, ``model.set_weights``), fit again.

        Args:
            x: inputs ``[N, ...]`` (array, tensor, dict or list of them, or a
                ``tf.data.Dataset`` of input batches).
            pred_type: ``"glm"`` (linearised) or ``"nn"`` (weight sampling).
            link_approx: ``"probit"``, ``"mc"`` or ``"bridge"`` (classification; binary:
                ``"probit"``/``"mc"``; regression needs none and takes the default). Used
                by ``"glm"`` only.
            n_samples: samples for ``link_approx="mc"`` and for ``pred_type="nn"``.
            seed: an integer seed for the random parts; None draws one. The same seed (and,
                for ``"mc"`` over all weights, which draws per batch, the same
                ``batch_size``) gives the same numbers; ``"nn"``, and ``"mc"`` of a
                last-layer posterior (sampled in weight space), draw one set of weights for
                all inputs.
            batch_size: inputs per batch (default 256); memory grows linearly with it.

        Returns:
            classification: probabilities ``[N, C]``; binary: ``[N, 1]``; regression:
            ``(mean [N, K], variance [N, K])``, the variance including ``sigma_noise**2``;
            heteroscedastic (outputs ``[mean (K), log-variance (K)]``): the same, with the
            predicted ``exp(log-variance)`` at the MAP (``"glm"``) or its mean over the weight
            samples (``"nn"``) as the noise.

        Raises:
            ValueError: before ``fit``; for an unknown ``pred_type``/``link_approx``, a link
                that does not fit the likelihood, ``n_samples < 1``, inputs that do not fit
                the model (:class:`~laplace_tf.inputs.InputCheck`), or an infinite dataset.
        """
        self._require_fit("la(x)")
        choice(pred_type, "pred_type", PRED_TYPES)
        self.likelihood.check_link(link_approx)
        n_samples = positive_int(n_samples, "n_samples")
        if pred_type == "nn":
            return self._nn(x, "predict", n_samples, seed, batch_size)
        return self._glm(x, "predict", link_approx, n_samples, seed, batch_size)

    def functional_variance(self, x, batch_size: int | None = None) -> tf.Tensor:
        """``J Sigma J^T`` ``[N, K, K]``: the GLM covariance of the network outputs (no noise).

        Example:
            ``la.functional_variance(x)`` equals ``J @ la.posterior_covariance @ J^T`` with
            ``J`` the per-example Jacobians of the logits.
        """
        self._require_fit("functional_variance")
        return self._glm(x, "variance", "probit", 1, None, batch_size)

    def predictive_samples(
        self,
        x,
        n_samples: int = 100,
        seed: int | None = None,
        pred_type: str = "glm",
        batch_size: int | None = None,
    ) -> tf.Tensor:
        """Samples ``[S, N, K]`` of the predicted outputs.

        Probabilities (classification, binary) or function values (regression, without the
        observation noise). ``"glm"``: logits drawn from ``N(f(x; theta*), J Sigma J^T)``;
        ``"nn"``: the network run with weights drawn from the posterior.
        """
        self._require_fit("predictive_samples")
        choice(pred_type, "pred_type", PRED_TYPES)
        n_samples = positive_int(n_samples, "n_samples")
        if pred_type == "nn":
            return self._nn(x, "samples", n_samples, seed, batch_size)
        return self._glm(x, "samples", "mc", n_samples, seed, batch_size)

    def predictive_std(self, x, pred_type: str = "glm", n_samples: int = 100,
                       seed: int | None = None, batch_size: int | None = None) -> tf.Tensor:
        """Regression: the predictive standard deviation ``[N, K]``, noise included.

        ``sqrt`` of the variance ``la(x, ...)`` returns (same arguments).

        Example:
            ``mean, var = la(x)`` then ``la.predictive_std(x) == sqrt(var)``.
        """
        self._require_regression("predictive_std")
        _, variance = self(x, pred_type=pred_type, n_samples=n_samples, seed=seed,
                           batch_size=batch_size)
        return tf.sqrt(variance)

    def predictive_interval(self, x, level: float = 0.95, batch_size: int | None = None
                            ) -> tuple[tf.Tensor, tf.Tensor]:
        """Regression: the central ``level`` interval ``(lower, upper)`` ``[N, K]`` of each
        output under the Gaussian GLM predictive (noise included), ``mean -+ z std`` with
        ``z = Phi^-1((1 + level) / 2)``.

        Example:
            ``level=0.95``: ``mean -+ 1.96 * la.predictive_std(x)``.
        """
        self._require_regression("predictive_interval")
        if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0 < level < 1:
            raise ValueError(
                f"level: expected the interval's probability, a number strictly between 0 and "
                f"1 such as 0.95; got {level!r}."
            )
        mean, variance = self(x, batch_size=batch_size)
        z = statistics.NormalDist().inv_cdf(0.5 + 0.5 * float(level))
        half_width = z * tf.sqrt(variance)
        return mean - half_width, mean + half_width

    def _require_regression(self, what: str) -> None:
        self._require_fit(what)
        if not self.likelihood.gaussian_predictive:
            raise ValueError(
                f"{what}: only for likelihood='regression' or 'heteroscedastic' (a Gaussian "
                f"predictive); this posterior has likelihood={self.likelihood_name!r}. For class "
                "probabilities use la(x), and la.functional_variance(x) for the spread of the "
                "logits."
            )

    def map_predict(self, x, batch_size: int | None = None):
        """The plain network at the MAP: probabilities, or ``(mean, noise variance)``
        (``sigma_noise**2``, or the predicted ``exp(log-variance)`` for heteroscedastic)."""
        self._require_fit("map_predict")
        step = self._compiled(("map",), "_map_step")
        noise = self._noise_variance(self.subset.dtype)
        return _join(self._over_batches(x, batch_size, lambda xb, _: step(xb, self.mean, noise)),
                     axis=0)

    def export(self, path, **options) -> _export.ExportInfo:
        """Write the predictive as a TensorFlow SavedModel that runs without laplace_tf.

        Its ``serving_default`` signature takes ``inputs [N, ...]`` and returns ``probs`` (or
        ``mean`` and ``variance``) and ``functional_variance``; options (``pred_type``,
        ``link_approx``, ``n_samples``, ``seed``, ``dtype``, ``input_shape``, ``max_bytes``)
        and refusals: :func:`laplace_tf.predictive.export.export`.

        Example:
            ``la.export("served")`` then ``tf.saved_model.load("served").signatures[
            "serving_default"](inputs=x)["probs"]`` equals ``la(x)``.
        """
        self._require_fit("export")
        return _export.export(self, path, **options)

    def to_keras(self, **options):
        """The predictive as a Keras model returning the dict of :meth:`export`'s outputs
        (same options); inference only."""
        self._require_fit("to_keras")
        return _export.to_keras(self, **options)

    # ------------------------------------------------------------------ internals

    def _glm(self, x, mode: str, link: str, n_samples: int, seed, batch_size):
        """Run the compiled GLM step over the batches of ``x`` and join the results."""
        if self.subset_of_weights == "last_layer" and (mode == "samples" or (
                mode == "predict" and link == "mc")):
            return self._last_layer_samples(x, mode, n_samples, seed, batch_size)
        seed = stateless_seed(seed)
        diagonal = mode == "predict" and not needs_full_covariance(link)
        blocks = self.covariance_blocks()
        fv = self._functional(blocks)
        prepared = self._cached(f"prepared_blocks_{diagonal}",  # shared work: once a state
                                lambda: fv.prepare(blocks, diagonal))
        noise = self._noise_variance(self.subset.dtype)
        # two compiled steps: the linearisation (the costly trace) is shared by every mode and link
        linearise = self._compiled(("linearise", fv), "_linearise_step", fv)
        step = self._compiled(("glm", fv, mode, link, n_samples), "_glm_step", fv,
                              diagonal=diagonal, mode=mode, link=link, n_samples=n_samples)
        outputs = self._over_batches(x, batch_size, lambda xb, index: step(
            linearise(xb, self.mean), prepared, noise,
            tf.random.experimental.stateless_fold_in(seed, index)
        ))
        return _join(outputs, axis=1 if mode == "samples" else 0)

    def _last_layer_samples(self, x, mode: str, n_samples: int, seed, batch_size):
        """GLM logit samples of a last-layer posterior, drawn in weight space.

        The logits are linear in the last layer's weights ``W [din (+1), K]``: ``f = a^T W``
        with ``a`` the layer's input rows (bias 1 appended), so ``f_s = f(theta*) + a^T dW_s``
        with ``dW_s = W_s - W*`` from weight samples ``W_s`` of the posterior has exactly the
        law ``N(f(theta*), J Sigma J^T)`` for every input. Drawing ``dW_s`` once for all inputs
        costs ``N din K`` a sample (and the posterior's own sampling, shared by all inputs),
        where Cholesky factors of ``[N, K, K]`` cost ``N K^3``. Measured
        (``benchmarks/predictive.py``, 1,000 classes, 2,000 inputs, 100 samples): 1.2 s against
        25 s for the Cholesky factors.
        The samples of different inputs share their weights (joint draws of the network).
        """
        deltas = self._last_layer_deltas(n_samples, stateless_seed(seed))
        step = self._compiled(("last_layer_samples", mode), "_last_layer_samples_step",
                              mode=mode)
        outputs = self._over_batches(x, batch_size, lambda xb, _: step(xb, self.mean, deltas))
        return _join(outputs, axis=1 if mode == "samples" else 0)

    def _last_layer_deltas(self, n_samples: int, seed: tf.Tensor) -> tf.Tensor:
        """``dW_s = W_s - W* ~ N(0, Sigma)`` ``[S, din (+1), K]`` (the row-major weight matrix),
        from the posterior's own sampler (structured: Kronecker ``Qa (Z / sqrt(E)) Qg^T``)."""
        n_outputs = int(self.subset.slices[0].variables[0].shape[-1])
        samples = self._draws(n_samples, seed) - self.mean
        return tf.reshape(samples, [n_samples, self.n_params // n_outputs, n_outputs])

    def _last_layer_samples_step(self, x, mean, deltas, *, mode):
        last_layer_features(self.logit_model, x)  # its condition (low-rank, GP fits skip it)
        layer = self.subset.slices[0].layer
        rows = []

        def record(hooked, inputs, z):
            rows.append(input_rows(hooked, inputs))
            return z

        logits = self.logit_model(x, self.subset.unflatten(mean), layers=[layer], hook=record)
        samples = logits + tf.einsum("nd,sdk->snk", tf.cast(rows[0], logits.dtype), deltas)
        outputs = self.likelihood.inverse_link(samples)
        return outputs if mode == "samples" else tf.reduce_mean(outputs, axis=0)

    def _nn(self, x, mode: str, n_samples: int, seed, batch_size):
        """Run the compiled sampling step over the batches of ``x`` and join the results."""
        thetas = tf.convert_to_tensor(self.sample(n_samples, seed=seed))
        noise = self._noise_variance(thetas.dtype)
        step = self._compiled(("nn", mode), "_nn_step", mode=mode)
        outputs = self._over_batches(x, batch_size, lambda xb, _: step(xb, thetas, noise))
        return _join(outputs, axis=1 if mode == "samples" else 0)

    def _functional(self, blocks) -> FunctionalVariance:
        """The :class:`FunctionalVariance` for the current block layout (built once, shared
        as :meth:`_compiled`'s steps are).

        A last-layer posterior uses the closed forms in the features: its layer's
        pre-activation is the model output (checked by ``last_layer_features``: at fit time,
        and at the first linearisation for the low-rank and GP structures, whose fits do not).
        """
        layout = (tuple(self.block_slices()), tuple(map(type, blocks)))
        shared = self._shared_steps()
        key = ("functional", layout)
        if key not in shared:
            shared[key] = FunctionalVariance(self.logit_model, layout[0], layout[1],
                                             logits_layer=self.subset_of_weights == "last_layer")
        return shared[key]

    def _shared_steps(self) -> dict:
        """The compiled steps of every predictive of this model, likelihood and weight subset
        (:func:`~laplace_tf.params.model_cache`): a second ``Laplace`` of the same model
        reuses them instead of tracing them again. The steps are bound to ``"owner"``, a shell
        with only the model-side attributes they read (the likelihood, for its link and
        predictive; its ``sigma_noise`` reaches the steps as an input): the posterior's own
        state always comes in as inputs, never captured."""
        shared = model_cache(self.model, (type(self), self.likelihood_name,
                                          self.subset.layout_key()))
        if "owner" not in shared:
            owner = object.__new__(type(self))
            for name in ("model", "likelihood", "logit_model", "subset", "subset_of_weights"):
                setattr(owner, name, getattr(self, name))
            shared["owner"] = owner
        return shared

    def _compiled(self, key: tuple, method: str, *args, **kwargs):
        """``tf.function`` of the step ``method`` (with ``args``, ``kwargs``), built once per
        ``key`` for all posteriors that share :meth:`_shared_steps` (a GLM step's key holds
        its :class:`FunctionalVariance`, one per block layout)."""
        shared = self._shared_steps()
        if key not in shared:
            step = functools.partial(getattr(shared["owner"], method), *args, **kwargs)
            shared[key] = compiled_per_shape(step, batched=1)  # x or a batch's pieces first
        return shared[key]

    def validation_scorer(self, batches, kwargs: dict):
        """``scores(priors)``: the mean validation NLL of ``la(x, **kwargs)`` over ``batches``
        of ``(x, y)``, and the log evidence, at each scalar prior precision of ``priors``
        (each one checked positive definite), for a grid search over the prior.

        For the GLM predictive with a deterministic link (probit, bridge, regression), each
        batch is linearised once (:meth:`FunctionalVariance.linearise`, batched as ``la(x)``
        batches it), and all of ``priors`` run in one compiled call (traced once per fitted
        state): per value the covariance blocks, their contraction with the pieces, the
        predictive and the evidence, the same numbers as ``la(x)`` and
        :meth:`log_marginal_likelihood`, without a Python round per value (10 values on the
        digits MLP: 1-3 ms of glue instead of 20-30). A value whose numbers come out
        non-finite there (a dense Cholesky factorisation that the eager path clips or refuses)
        is scored again the eager way. Otherwise each value sets the prior and calls
        ``la(x, **kwargs)``. A value whose covariance cannot be formed (a float32 precision
        that fails its Cholesky factorisation) scores NLL ``inf`` and evidence NaN.
        """
        def eager_scores(priors):
            nll, evidence = [], []
            for prior in priors:
                self.prior_precision = prior
                total, count = 0.0, 0
                try:
                    for x, y in batches:
                        total += self.likelihood.validation_nll(self(x, **kwargs), y)
                        count += len(y)
                except NotPositiveDefiniteError:
                    nll.append(np.inf)
                    evidence.append(np.nan)
                    continue
                nll.append(total / count)
                evidence.append(float(self.log_marginal_likelihood()))
            return np.array(nll), np.array(evidence)

        link = kwargs.get("link_approx", "probit")
        if kwargs.get("pred_type", "glm") != "glm" or link == "mc":
            return eager_scores
        diagonal = not needs_full_covariance(link)
        fv = self._functional(self.covariance_blocks())  # the layout, the same for every prior
        linearise = self._compiled(("linearise", fv), "_linearise_step", fv)
        targets: list = []  # per validation batch: its targets
        pieces: list[list] = []  # ... and the pieces of its sub-batches
        for x, y in batches:
            targets.append(y)
            pieces.append(self._over_batches(x, None, lambda xb, _: linearise(xb, self.mean)))
        count = sum(len(y) for y in targets)
        specs = tf.nest.map_structure(  # any grid, any validation batch sizes: one trace
            lambda t: None if t is None else tf.TensorSpec([None, *t.shape[1:]], t.dtype), pieces)
        noise = self._noise_variance(self.subset.dtype)
        run = self.tuner(
            ("gridsearch", fv, link, tuple(map(len, pieces)), tuple(tf.nest.flatten(specs))),
            lambda: tf.function(functools.partial(
                self._grid_outputs, fv, diagonal, link), autograph=False,
            ).get_concrete_function(tf.TensorSpec([None], self.subset.dtype), specs, noise,
                                    self.sigma_noise))

        def scores(priors):
            outputs, evidence = run(tf.constant(priors, self.subset.dtype), pieces, noise,
                                    self.sigma_noise)
            nll = np.array([sum(
                self.likelihood.validation_nll(_value(out, g), y)
                for out, y in zip(outputs, targets, strict=True)) / count
                for g in range(len(priors))])
            evidence = evidence.numpy().astype(np.float64)
            again = ~(np.isfinite(nll) & np.isfinite(evidence))
            if again.any():
                nll[again], evidence[again] = eager_scores(np.asarray(priors)[again])
            return nll, evidence
        return scores

    def _grid_outputs(self, fv: FunctionalVariance, diagonal: bool, link: str, priors, pieces,
                      noise, sigma):
        """The GLM predictive of every validation batch (from its ``pieces``) and the log
        evidence, at each scalar prior of ``priors`` (``tf.map_fn``, one value at a time)."""
        dtype = self.subset.dtype
        factors, c = self._require_fit("gridsearch").factors, self._multiplier(sigma)
        per_batch = (dtype, dtype) if self.likelihood.gaussian_predictive else dtype

        def one(prior):
            blocks = [f.covariance(c, p) for f, p in zip(factors, self._block_priors(prior),
                                                          strict=True)]
            prepared = fv.prepare(blocks, diagonal)
            outputs = [_join([self._glm_step(fv, p, prepared, noise, None, diagonal=diagonal,
                                             mode="predict", link=link, n_samples=1)
                              for p in batch], axis=0)
                       for batch in pieces]
            return outputs, self.log_evidence(prior, sigma)

        return tf.map_fn(one, priors, fn_output_signature=([per_batch] * len(pieces), dtype))

    def _linearise_step(self, fv: FunctionalVariance, x, mean):
        return fv.linearise(x, mean)

    def _glm_step(self, fv: FunctionalVariance, pieces, blocks, noise, seed, *, diagonal, mode,
                  link, n_samples):
        """One batch of the GLM predictive (``mode``: predict, variance or samples) from its
        linearisation ``pieces`` (:meth:`FunctionalVariance.linearise`)."""
        logits, variance = fv.contract(pieces, blocks, diagonal)
        return self._glm_outputs(logits, variance, noise, seed, mode=mode, link=link,
                                 n_samples=n_samples)

    def _glm_outputs(self, logits, variance, noise, seed, *, mode, link, n_samples):
        likelihood = self.likelihood
        if mode == "variance":
            return variance
        if mode == "samples" or link == "mc":
            outputs = likelihood.inverse_link(gaussian_samples(logits, variance, n_samples, seed))
            return outputs if mode == "samples" else tf.reduce_mean(outputs, axis=0)
        if link == "bridge":
            return bridge(logits, variance)
        return likelihood.glm_predictive(logits, variance, noise)

    def _nn_step(self, x, thetas, noise, *, mode):
        """One batch of the sampling predictive: ``[S, N, K]`` outputs, or their moments."""
        logits = self._sampled_logits(x, thetas)
        if mode == "samples":
            return self.likelihood.inverse_link(logits)
        return self.likelihood.sampled_predictive(logits, noise)

    def _sampled_logits(self, x, thetas):
        """Logits ``[S, N, K]`` for weight samples ``[S, P]``, ``SAMPLES_IN_FLIGHT`` at a time.

        A ``tf.map_fn`` over samples: on CPU it measured faster than ``tf.vectorized_map`` over
        chunks of samples (MLP 784-256-256-10, 100 samples, batches of 256: 44x one forward
        pass against 58x for chunks of 10 and 80x for chunks of 25), and its memory does not
        grow with the number of samples.
        """

        def run(theta):
            return self.logit_model(x, self.subset.unflatten(theta))

        return tf.map_fn(run, thetas, fn_output_signature=thetas.dtype,
                         parallel_iterations=SAMPLES_IN_FLIGHT)

    def _map_step(self, x, mean, noise):
        return self.likelihood.map_predictive(self.logit_model(x, self.subset.unflatten(mean)),
                                              noise)

    def _noise_variance(self, dtype) -> tf.Tensor:
        """``sigma_noise**2`` (scalar or ``[K]``) for regression, else 0."""
        return self.likelihood.noise_variance(dtype)

    def _over_batches(self, x, batch_size: int | None, step) -> list:
        """``step(batch, index)`` for every batch of ``x`` (in the model dtype).

        The inputs are checked against the model (:class:`~laplace_tf.inputs.InputCheck`);
        when the first batch fails, one example is run through the plain model to tell inputs
        that do not fit the model (a clear ValueError) from other failures.
        """
        size = DEFAULT_BATCH_SIZE if batch_size is None else positive_int(batch_size, "batch_size")
        check = InputCheck(self.model)
        outputs = []
        for index, xb in enumerate(iterate_inputs(x, size, self.subset.dtype, check)):
            try:
                outputs.append(step(xb, index))
            except MODEL_ERRORS as err:
                explain_grouped_convolution(self.model, err)
                if index == 0:
                    check.explain(xb, err)
                raise
        if not outputs:
            raise ValueError("x: got no inputs; give at least one example [N >= 1, ...].")
        return outputs


def _value(outputs, index: int):
    """Entry ``index`` of (nested) outputs stacked over prior values."""
    return tf.nest.map_structure(lambda t: t[index], outputs)


def _join(outputs: list, axis: int):
    if isinstance(outputs[0], tuple):
        return tuple(tf.concat(parts, axis=axis) for parts in zip(*outputs, strict=True))
    return tf.concat(outputs, axis=axis)




