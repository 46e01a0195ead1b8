"""Posterior math on hand-made curvature: every structure against dense numpy/scipy references.

The curvature blocks here are random symmetric positive (semi-)definite matrices installed
directly, so these tests judge the posterior alone (precision, distribution, evidence, tuning,
clipping, save/load), independently of how curvature is computed.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
import tensorflow_probability as tfp
from models import tanh_mlp

from laplace_tf.blocks import (
    DenseBlock,
    DiagBlock,
    KronBlock,
    LinearOperatorKroneckerEigen,
    blocks_to_dense,
    dense,
)
from laplace_tf.blocks.base import eigh
from laplace_tf.curvature.base import Curvature
from laplace_tf.posterior import PosteriorLaplace
from laplace_tf.posterior.structures import StructuredNormal
from laplace_tf.testing import finite_difference_gradient

tfd = tfp.distributions
F64 = tf.float64


def _spd(rng, n, rank=None, ridge=0.05):
    m = rng.normal(size=(n, rank or n))
    return m @ m.T / n + ridge * np.eye(n)


def _orthogonal(rng, n):
    return np.linalg.qr(rng.normal(size=(n, n)))[0]


def _kron_dims(layer_slice):
    kernel = layer_slice.variables[0]
    din, dout = kernel.shape
    return din + (len(layer_slice.variables) == 2), dout


def _blocks(la, kind, rng):
    """Random curvature blocks over ``la``'s weights in the layout of ``kind``."""
    P = la.n_params
    if kind == "full":
        return [DenseBlock(tf.constant(_spd(rng, P)))]
    if kind == "diag":
        return [DiagBlock(tf.constant(rng.uniform(0.0, 3.0, P)))]
    blocks = []
    for i, s in enumerate(la.subset.slices):
        din, dout = _kron_dims(s)
        if kind == "kron_mixed" and i == 0:  # a layer without a Kronecker rule
            blocks.append(DiagBlock(tf.constant(rng.uniform(0.0, 3.0, s.size))))
        else:
            n = tf.constant(7.0, F64)
            blocks.append(KronBlock(tf.constant(_spd(rng, din)), tf.constant(_spd(rng, dout)), n))
    return blocks


LIKELIHOOD_OUTPUTS = {"regression": 2, "classification": 3}


def make(structure="kron", subset="all", likelihood="regression", blocks="auto", seed=0,
         fit_sigma=0.7, curvature_kind="ggn", **kwargs):
    """A PosteriorLaplace on a tanh MLP with random curvature of ``blocks`` layout installed."""
    model, _ = tanh_mlp(LIKELIHOOD_OUTPUTS[likelihood], seed=seed)
    if likelihood == "regression":
        kwargs.setdefault("sigma_noise", fit_sigma)
    la = PosteriorLaplace(model, likelihood, subset, structure, curvature=curvature_kind,
                          progress=False, **kwargs)
    rng = np.random.default_rng(seed + 10)
    layout = structure if blocks == "auto" else blocks
    residual_ss = tf.constant([1.3, 0.4], F64) if likelihood == "regression" else None
    curvature = Curvature(structure, _blocks(la, layout, rng), tf.constant(2.5, F64), 9, residual_ss)
    la._install(curvature, la.subset.flat_values(),
                np.asarray(fit_sigma) if likelihood == "regression" else None,
                la.subset.fingerprint())
    return la


def prior_of(la, kind, seed=0):
    rng = np.random.default_rng(seed + 20)
    return {"scalar": 0.8, "layerwise": rng.uniform(0.3, 3.0, len(la.subset.slices)),
            "diag": rng.uniform(0.3, 3.0, la.n_params)}[kind]


def dense_prior(la, prior):
    prior = np.asarray(prior, np.float64)
    if prior.ndim == 0:
        return np.full(la.n_params, float(prior))
    if prior.size == len(la.subset.slices):
        return np.repeat(prior, [s.size for s in la.subset.slices])
    return prior


def dense_precision(la, prior=None, sigma=None, temperature=None):
    """``s H / T + diag(lambda)`` from the dense curvature, by hand."""
    H = blocks_to_dense(la.curvature.blocks).numpy()
    prior = la.prior_precision.numpy() if prior is None else prior
    sigma = float(la.sigma_noise) if sigma is None else sigma
    T = la.temperature if temperature is None else temperature
    s = 1.0
    if la.likelihood_name == "regression":
        s = (float(la._fit_sigma) / sigma) ** (4 if la.curvature_kind == "ef" else 2)
    return s * H / T + np.diag(dense_prior(la, prior))


CASES = [  # (structure, subset, block layout, prior kind)
    ("full", "all", "full", "scalar"), ("full", "all", "full", "layerwise"),
    ("full", "all", "full", "diag"), ("full", "last_layer", "full", "diag"),
    ("kron", "all", "kron", "scalar"), ("kron", "all", "kron", "layerwise"),
    ("kron", "all", "kron_mixed", "layerwise"), ("kron", "last_layer", "kron", "scalar"),
    ("diag", "all", "diag", "scalar"), ("diag", "all", "diag", "layerwise"),
    ("diag", "last_layer", "diag", "diag"),
]
DISTRIBUTIONS = {"full": tfd.MultivariateNormalTriL,
                 "kron": StructuredNormal,  # variances from the blocks, not scale @ scale^T
                 "diag": tfd.MultivariateNormalDiag}


def _case(structure, subset, layout, prior_kind, **kwargs):
    la = make(structure, subset, blocks=layout, temperature=1.7, **kwargs)
    la.prior_precision = prior_of(la, prior_kind)
    la.sigma_noise = 0.55  # the curvature was fitted at 0.7: rescaled, not refitted
    return la


# ---------------------------------------------------------------------------- operators
def test_kronecker_eigen_operator_matches_dense_linear_algebra():
    rng = np.random.default_rng(1)
    Qa, Qg, E = _orthogonal(rng, 4), _orthogonal(rng, 3), rng.uniform(0.5, 3.0, (4, 3))
    op = LinearOperatorKroneckerEigen(Qa, Qg, E)
    Q = np.kron(Qa, Qg)
    dense = Q @ np.diag(E.ravel()) @ Q.T
    x = rng.normal(size=(2, 12, 5))  # batched right-hand sides
    dense_tf = tf.linalg.LinearOperatorFullMatrix(tf.constant(dense), is_self_adjoint=True,
                                                  is_positive_definite=True)
    np.testing.assert_allclose(op.to_dense(), dense, atol=1e-13)
    np.testing.assert_allclose(op.inverse().to_dense(), np.linalg.inv(dense), atol=1e-12)
    np.testing.assert_allclose(op.power(-0.5).to_dense() @ op.power(-0.5).to_dense(),
                               np.linalg.inv(dense), atol=1e-12)
    np.testing.assert_allclose(op.log_abs_determinant(), dense_tf.log_abs_determinant(), atol=1e-12)
    np.testing.assert_allclose(op.matmul(x), dense_tf.matmul(x), atol=1e-12)
    np.testing.assert_allclose(op.matvec(x[0, :, 0]), dense @ x[0, :, 0], atol=1e-12)
    np.testing.assert_allclose(op.solve(x), dense_tf.solve(x), atol=1e-11)
    np.testing.assert_allclose(op.diag_part(), np.diag(dense), atol=1e-13)
    np.testing.assert_allclose(op.trace(), np.trace(dense), atol=1e-12)
    np.testing.assert_allclose(op.eigvals(), np.linalg.eigvalsh(dense), atol=1e-12)
    assert isinstance(op.inverse(), LinearOperatorKroneckerEigen)


# ---------------------------------------------------------------------------- the posterior
@pytest.mark.parametrize(("structure", "subset", "layout", "prior_kind"), CASES)
def test_precision_covariance_and_log_prob_match_dense(structure, subset, layout, prior_kind):
    la = _case(structure, subset, layout, prior_kind)
    precision = dense_precision(la)
    covariance = np.linalg.inv(precision)
    np.testing.assert_allclose(la.posterior_precision.to_dense(), precision, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(la.posterior_covariance, covariance, rtol=1e-9, atol=1e-12)
    for (offset, size), block in zip(la.block_slices(), la.covariance_blocks(), strict=True):
        part = covariance[offset:offset + size, offset:offset + size]
        np.testing.assert_allclose(block.to_dense(), part, rtol=1e-9, atol=1e-12)
    assert type(la.posterior) is DISTRIBUTIONS[structure]
    np.testing.assert_allclose(la.posterior.variance(), np.diag(covariance), rtol=1e-10)
    np.testing.assert_allclose(la.posterior.stddev(), np.sqrt(np.diag(covariance)), rtol=1e-10)
    rng = np.random.default_rng(3)
    theta = la.mean.numpy() + rng.normal(size=(4, la.n_params)) * 0.3
    reference = scipy.stats.multivariate_normal(la.mean.numpy(), covariance).logpdf(theta)
    np.testing.assert_allclose(la.posterior.log_prob(theta), reference, rtol=1e-10)
    np.testing.assert_allclose(
        la.posterior_precision.log_abs_determinant(), np.linalg.slogdet(precision)[1], rtol=1e-11
    )


def test_kron_posterior_variances_need_no_dense_matrix(monkeypatch):
    """TFP's own ``stddev()`` forms ``scale @ scale^T``: ``[P, P]`` (an OOM at P = 93k)."""
    la = _case("kron", "all", "kron", "layerwise")
    expected = np.sqrt(np.diag(np.linalg.inv(dense_precision(la))))

    def refused(self):
        raise AssertionError("a dense Kronecker matrix was formed")

    monkeypatch.setattr(LinearOperatorKroneckerEigen, "_to_dense", refused)
    np.testing.assert_allclose(la.posterior.stddev(), expected, rtol=1e-10)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_samples_have_the_posterior_moments(structure):
    la = _case(structure, "all", structure, "layerwise")
    n = 40000
    samples = la.sample(n, seed=7).numpy()
    covariance = np.linalg.inv(dense_precision(la))
    std = np.sqrt(np.diag(covariance))
    assert samples.shape == (n, la.n_params)
    assert np.all(np.abs(samples.mean(0) - la.mean.numpy()) < 5 * std / np.sqrt(n))
    # sd of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / n)
    se = np.sqrt((np.outer(std**2, std**2) + covariance**2) / n)
    assert np.all(np.abs(np.cov(samples.T) - covariance) < 5.5 * se)
    np.testing.assert_array_equal(la.sample(5, seed=7), la.sample(5, seed=7))
    assert not np.allclose(la.sample(5, seed=7), la.sample(5, seed=8))


def test_full_posterior_uses_no_eigendecomposition_until_tuning_asks(monkeypatch):
    calls = []

    def counting_eigh(matrix, vectors=True):
        calls.append(vectors)
        return eigh(matrix, vectors)

    monkeypatch.setattr(dense, "eigh", counting_eigh)
    la = make("full", "all", "classification", blocks="full", prior_precision=0.8)
    covariance = np.linalg.inv(dense_precision(la))
    np.testing.assert_allclose(la.posterior_covariance, covariance, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(la.posterior.stddev(), np.sqrt(np.diag(covariance)), rtol=1e-9)
    la.sample(3, seed=0)
    assert calls == []  # fit, covariance and sampling: Cholesky factorisations only
    for prior in (0.8, 2.5):  # a scalar prior's log-determinant: the eigenvalues, once
        np.testing.assert_allclose(la.log_marginal_likelihood(prior), dense_evidence(la, prior),
                                   rtol=1e-10)
    assert calls == [False]


# ---------------------------------------------------------------------------- evidence
def dense_evidence(la, prior, sigma=None, prior_mean=0.0):
    """The Laplace log evidence from the dense precision, in numpy."""
    T = la.temperature
    if la.likelihood_name == "regression":
        rss, n = la.curvature.residual_ss.numpy(), la.curvature.n_data
        nll = 0.5 * np.sum(rss) / sigma**2 + n * rss.size * np.log(sigma) \
            + 0.5 * n * rss.size * np.log(2 * np.pi)
    else:
        nll = float(la.curvature.nll)
    lam = dense_prior(la, prior)
    delta = la.mean.numpy() - prior_mean
    return (-nll / T - 0.5 * np.sum(lam * delta**2) + 0.5 * np.sum(np.log(lam))
            - 0.5 * np.linalg.slogdet(dense_precision(la, prior, sigma))[1])


@pytest.mark.parametrize(("structure", "subset", "layout", "prior_kind"), CASES[::2])
@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_log_marginal_likelihood_matches_dense_formula(structure, subset, layout, prior_kind,
                                                       likelihood):
    la = make(structure, subset, likelihood, blocks=layout, temperature=0.8, prior_mean=0.2)
    prior = prior_of(la, prior_kind, seed=1)
    sigma = 0.9 if likelihood == "regression" else None
    expected = dense_evidence(la, prior, sigma if sigma else 1.0, prior_mean=0.2)
    got = la.log_marginal_likelihood(prior, sigma)
    np.testing.assert_allclose(got, expected, rtol=1e-11)
    # the stored prior is untouched, and the defaults use it
    np.testing.assert_allclose(la.prior_precision, 1.0)
    la.prior_precision = prior
    if sigma:
        la.sigma_noise = sigma
    np.testing.assert_allclose(la.log_marginal_likelihood(), expected, rtol=1e-11)


@pytest.mark.parametrize(("structure", "prior_kind", "curvature_kind"),
                         [("full", "diag", "ggn"), ("kron", "layerwise", "ggn"),
                          ("diag", "scalar", "ef")])
def test_evidence_gradient_matches_finite_differences(structure, prior_kind, curvature_kind):
    la = make(structure, "all", curvature_kind=curvature_kind)
    prior = np.asarray(prior_of(la, prior_kind), np.float64)
    log_prior, log_sigma = tf.Variable(np.log(prior)), tf.Variable(np.log(0.6))
    with tf.GradientTape() as tape:
        value = la.log_marginal_likelihood(tf.exp(log_prior), tf.exp(log_sigma))
    grad_prior, grad_sigma = tape.gradient(value, [log_prior, log_sigma])

    def evidence(log_p, log_s):
        return dense_evidence(la, np.exp(log_p), float(np.exp(log_s)))

    np.testing.assert_allclose(
        grad_prior, finite_difference_gradient(lambda v: evidence(v, np.log(0.6)), np.log(prior)),
        rtol=1e-6, atol=1e-7,
    )
    np.testing.assert_allclose(
        grad_sigma, finite_difference_gradient(lambda v: evidence(np.log(prior), v[0]),
                                               np.array([np.log(0.6)]))[0], rtol=1e-6,
    )


@pytest.mark.parametrize(("structure", "likelihood"),
                         [("full", "classification"), ("kron", "regression"),
                          ("diag", "classification")])
def test_marglik_tuning_lands_on_the_grid_maximiser(structure, likelihood):
    la = make(structure, "all", likelihood)
    result = la.optimize_prior_precision(n_steps=300, lr=0.1, tune_sigma_noise=False,
                                         progress=False)
    tuned = float(result["prior_precision"])
    # the evidence over a fine grid of log(lambda), by hand from the eigenvalues of H / T
    eig = np.linalg.eigvalsh(blocks_to_dense(la.curvature.blocks).numpy())
    grid = np.linspace(-4.0, 4.0, 8001)
    lam = np.exp(grid)[:, None]
    sq = np.sum(la.mean.numpy() ** 2)
    base = dense_evidence(la, 1.0, 0.7) + 0.5 * np.sum(np.log(eig + 1.0)) + 0.5 * sq
    values = base - 0.5 * lam[:, 0] * sq + 0.5 * la.n_params * np.log(lam[:, 0]) \
        - 0.5 * np.sum(np.log(eig[None, :] + lam), axis=1)
    best = grid[np.argmax(values)]
    assert abs(np.log(tuned) - best) <= 1e-3
    # at the true maximiser the evidence is at least the grid's best, and within the grid's
    # second-order resolution of it
    assert 0 <= la.tuning_trace["log_marginal_likelihood"][-1] - values.max() < 1e-6


def test_tuning_trace_records_every_step():
    la = make("diag", "all")
    la.optimize_prior_precision(prior_structure="layerwise", n_steps=12, progress=False)
    trace = la.tuning_trace
    assert trace["prior_precision"].shape == (13, 2)
    assert trace["log_marginal_likelihood"].shape == trace["sigma_noise"].shape == (13,)
    for k in (0, 6, 12):
        np.testing.assert_allclose(
            trace["log_marginal_likelihood"][k],
            dense_evidence(la, trace["prior_precision"][k], trace["sigma_noise"][k]), rtol=1e-10,
        )
    np.testing.assert_allclose(la.prior_precision, trace["prior_precision"][-1])
    np.testing.assert_allclose(la.sigma_noise, trace["sigma_noise"][-1])
    assert trace["log_marginal_likelihood"][-1] > trace["log_marginal_likelihood"][0]


def test_repeated_tuning_reuses_the_compiled_loop_but_never_stale_state():
    la = make("kron", "all")
    first = la.optimize_prior_precision(n_steps=10, progress=False)
    trace = la.tuning_trace
    tuner = la._tuners[("scalar", True)]
    la.prior_precision, la.sigma_noise = 1.0, 0.7  # back to the start: inputs, not state
    again = la.optimize_prior_precision(n_steps=10, progress=False)
    assert la._tuners[("scalar", True)] is tuner
    for key in ("prior_precision", "sigma_noise"):
        np.testing.assert_array_equal(again[key], first[key])  # Adam state was reset
        np.testing.assert_array_equal(la.tuning_trace[key], trace[key])
    la.prior_mean = 0.3  # captured by the compiled evidence: a new tuner
    la.optimize_prior_precision(n_steps=10, progress=False)
    assert la._tuners[("scalar", True)] is not tuner
    end = la.tuning_trace
    np.testing.assert_allclose(
        end["log_marginal_likelihood"][-1],
        dense_evidence(la, end["prior_precision"][-1], end["sigma_noise"][-1], prior_mean=0.3),
        rtol=1e-11,
    )


# ---------------------------------------------------------------------------- indefinite
def _indefinite(structure, rng):
    if structure == "full":
        return lambda la: [DenseBlock(tf.constant(_spd(rng, la.n_params) - 0.6 * np.eye(la.n_params)))]
    if structure == "diag":
        return lambda la: [DiagBlock(tf.constant(rng.uniform(-2.0, 2.0, la.n_params)))]

    def kron(la):
        blocks = _blocks(la, "kron", rng)
        A = blocks[0].A.numpy()
        blocks[0] = KronBlock(tf.constant(A - 2.0 * np.eye(len(A))), blocks[0].G, blocks[0].n)
        return blocks

    return kron


def _clipped_dense(structure, blocks):
    """The dense curvature with negative eigenvalues set to zero (Kronecker: of A)."""
    if structure == "kron":
        a, Qa = np.linalg.eigh(blocks[0].A.numpy())
        return blocks_to_dense([KronBlock(tf.constant(Qa @ np.diag(np.maximum(a, 0)) @ Qa.T),
                                          blocks[0].G, blocks[0].n), *blocks[1:]]).numpy()
    e, Q = np.linalg.eigh(blocks_to_dense(blocks).numpy())
    return Q @ np.diag(np.maximum(e, 0)) @ Q.T


def _indefinite_case(structure, curvature_kind, **options):
    rng = np.random.default_rng(4)
    model, _ = tanh_mlp(2)
    la = PosteriorLaplace(model, "regression", "all", structure, curvature=curvature_kind,
                          prior_precision=0.01, progress=False, **options)
    blocks = _indefinite(structure, rng)(la)
    curvature = Curvature(structure, blocks, tf.constant(1.0, F64), 4, tf.constant([1.0, 1.0], F64))
    return la, blocks, (curvature, la.subset.flat_values(), np.asarray(1.0), "hash")


def test_indefinite_exact_hessian_raises_or_clips():
    raising, blocks, args = _indefinite_case("full", "hessian")
    with pytest.raises(ValueError, match="not positive definite.*on_indefinite='clip'"):
        raising._install(*args)
    assert raising.curvature is None
    clipping, _, _ = _indefinite_case("full", "hessian", on_indefinite="clip")
    with pytest.warns(UserWarning, match=r"clipped \d+ of \d+ curvature eigenvalues") as record:
        clipping._install(*args)
    n_clipped = int(str(record[0].message).split("clipped ")[1].split(" ")[0])
    assert n_clipped == np.sum(np.linalg.eigvalsh(blocks_to_dense(blocks).numpy()) < 0) > 0
    dense = _clipped_dense("full", blocks)
    np.testing.assert_allclose(clipping.posterior_precision.to_dense(),
                               dense + 0.01 * np.eye(len(dense)), atol=1e-12)
    # a prior large enough makes the raw precision positive definite: no error then
    raising.prior_precision = 10.0
    raising._install(*args)
    with pytest.raises(ValueError, match="not positive definite"):
        raising.prior_precision = 0.01
    np.testing.assert_allclose(raising.prior_precision, 10.0)



@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_ggn_negative_eigenvalues_are_clipped_silently(structure):
    # the GGN is positive semi-definite by construction: negatives can only be round-off
    la, blocks, args = _indefinite_case(structure, "ggn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la._install(*args)
    dense = _clipped_dense(structure, blocks)
    np.testing.assert_allclose(la.posterior_precision.to_dense(),
                               dense + 0.01 * np.eye(len(dense)), atol=1e-12)

def test_positive_semidefinite_round_off_is_not_reported():
    model, _ = tanh_mlp(2)
    la = PosteriorLaplace(model, "regression", "all", "full", on_indefinite="clip", progress=False)
    rng = np.random.default_rng(5)
    H = _spd(rng, la.n_params, rank=3, ridge=0.0)  # rank 3: eigenvalues ~ +-1e-16
    curvature = Curvature("full", [DenseBlock(tf.constant(H))], tf.constant(1.0, F64), 4,
                          tf.constant([1.0, 1.0], F64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la._install(curvature, la.subset.flat_values(), np.asarray(1.0), "hash")
