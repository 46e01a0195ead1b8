"""Every block type against dense NumPy references: the interface of laplace_tf.blocks.

One small float64 example per registered block type (2 inputs x K = 3 outputs, 6 weights,
outputs fastest); each method is checked against the same computation on the dense matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from laplace_tf.blocks import (
    BLOCK_TYPES,
    DenseBlock,
    DiagBlock,
    KronBlock,
    LayerJacobian,
    LowRankBlock,
    PermutedKronBlock,
)

DIN, K = 2, 3
SIZE = DIN * K
ORDER = np.array([3, 0, 4, 1, 5, 2])  # a PermutedKronBlock's order: weight ORDER[i] at i
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _psd(rng, n):
    m = rng.normal(size=(n, n))
    return m @ m.T + 0.1 * np.eye(n)


def _example(name: str, seed: int, A=None):
    """A block of type ``name`` and its dense matrix."""
    rng = np.random.default_rng(seed)
    if name == "DenseBlock":
        block = DenseBlock(tf.constant(_psd(rng, SIZE)))
    elif name == "KronBlock":
        A = _psd(rng, DIN) if A is None else A
        block = KronBlock(tf.constant(A), tf.constant(_psd(rng, K)), tf.constant(float(seed + 2), tf.float64))
    elif name == "PermutedKronBlock":
        kron = _example("KronBlock", seed, A)
        block = PermutedKronBlock(*kron, tf.constant(ORDER, tf.int32))
    elif name == "LowRankBlock":  # rank 4 of 6: two zero eigenvalues
        block = LowRankBlock(tf.constant(rng.normal(size=(4, SIZE))))
    else:
        block = DiagBlock(tf.constant(rng.uniform(0.5, 2.0, SIZE)))
    return block


def _dense(block) -> np.ndarray:
    """The dense matrix from the block's raw fields (not its own to_dense)."""
    if isinstance(block, DenseBlock):
        return block.matrix.numpy()
    if isinstance(block, KronBlock):
        return np.kron(block.A.numpy(), block.G.numpy())
    if isinstance(block, PermutedKronBlock):  # entry (ORDER[i], ORDER[j]) is kron's (i, j)
        dense = np.zeros((SIZE, SIZE))
        dense[np.ix_(ORDER, ORDER)] = np.kron(block.A.numpy(), block.G.numpy())
        return dense
    if isinstance(block, LowRankBlock):
        return block.root.numpy().T @ block.root.numpy()
    return np.diag(block.diagonal.numpy())


NAMES = sorted(BLOCK_TYPES)


def test_registry_holds_every_block_type_by_name():
    assert NAMES == ["DenseBlock", "DiagBlock", "KronBlock", "LowRankBlock", "PermutedKronBlock"]
    for name, cls in BLOCK_TYPES.items():
        block = _example(name, 0)
        assert type(block) is cls and cls(*block) == block  # the fields are its arrays


@pytest.mark.parametrize("name", NAMES)
def test_block_algebra_matches_dense(name):
    first, second = _example(name, 0), _example(name, 1)
    H1, H2 = _dense(first), _dense(second)
    assert first.size == SIZE
    np.testing.assert_allclose(first.to_dense(), H1, **TIGHT)
    np.testing.assert_allclose(first.scaled(2.5).to_dense(), 2.5 * H1, **TIGHT)
    union = first.add(second)
    if name in ("KronBlock", "PermutedKronBlock"):  # A a mean over n rows, G a sum
        n1, n2 = float(first.n), float(second.n)
        A = (n1 * first.A.numpy() + n2 * second.A.numpy()) / (n1 + n2)
        expected = _dense(first._replace(A=tf.constant(A), G=first.G + second.G))
        summed = first._replace(A=first.A * first.n)
        np.testing.assert_allclose(summed.from_sum_form().to_dense(), H1, **TIGHT)
    else:
        expected = H1 + H2
        assert first.from_sum_form() is first
    np.testing.assert_allclose(union.to_dense(), expected, **TIGHT)
    with pytest.raises(ValueError, match="same hessian_structure"):
        first.add(_example("DiagBlock" if name != "DiagBlock" else "DenseBlock", 0))


@pytest.mark.parametrize("name", NAMES)
def test_noise_rescaling_and_weighted_sums_match_dense(name):
    first = _example(name, 0)
    scales = np.array([4.0, 0.25, 2.0])
    root = np.sqrt(np.tile(scales, DIN))  # outputs fastest
    if name == "PermutedKronBlock":  # never a last layer's: no per-output rescaling
        with pytest.raises(ValueError, match="sigma_noise: a per-output noise"):
            first.rescaled(tf.constant(scales))
    else:
        rescaled = first.rescaled(tf.constant(scales)).to_dense()
        np.testing.assert_allclose(rescaled, root[:, None] * _dense(first) * root[None, :],
                                   **TIGHT)
    shared_A = first.A.numpy() if name in ("KronBlock", "PermutedKronBlock") else None
    second = _example(name, 1, A=shared_A)
    weights = [0.5, 0.2] if name == "LowRankBlock" else [0.5, -0.2]  # H = R^T R stays PSD
    combined = type(first).combine([first, second], tf.constant(weights, tf.float64))
    np.testing.assert_allclose(
        combined.to_dense(), weights[0] * _dense(first) + weights[1] * _dense(second), **TIGHT)
    if name == "LowRankBlock":
        with pytest.raises(ValueError, match="scalar sigma_noise"):
            type(first).combine([first, second], tf.constant([0.5, -0.2], tf.float64))


@pytest.mark.parametrize("name", NAMES)
def test_log_det_spectrum_and_factor_match_dense(name):
    block = _example(name, 0)
    H = _dense(block)
    c, prior = tf.constant(0.7, tf.float64), tf.constant(1.3, tf.float64)
    P = 0.7 * H + 1.3 * np.eye(SIZE)
    _, expected_log_det = np.linalg.slogdet(P)
    np.testing.assert_allclose(float(block.log_det_precision(c, prior)), expected_log_det, **TIGHT)
    np.testing.assert_allclose(np.sort(block.spectrum(SIZE)), np.linalg.eigvalsh(H), **TIGHT)
    factor = block.factorize()
    np.testing.assert_allclose(factor.precision(c, prior).to_dense(), P, **TIGHT)
    np.testing.assert_allclose(float(factor.log_det(c, prior)), expected_log_det, **TIGHT)
    np.testing.assert_allclose(float(factor.smallest_precision_eigenvalue(c, prior)),
                               np.linalg.eigvalsh(P)[0], **TIGHT)
    covariance = factor.covariance(c, prior).to_dense().numpy()
    np.testing.assert_allclose(covariance, np.linalg.inv(P), **TIGHT)
    S = factor.scale(c, prior).to_dense().numpy()
    np.testing.assert_allclose(S @ S.T, np.linalg.inv(P), **TIGHT)


def test_dense_spectrum_refuses_above_its_order_limit():
    assert _example("DenseBlock", 0).spectrum(SIZE - 1) is None


def _covariance(name):
    return _example(name, 0).factorize().covariance(tf.constant(1.0, tf.float64),
                                                    tf.constant(0.5, tf.float64))


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("locations", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_covariance_contracts_a_factored_jacobian_like_dense(name, locations, diagonal):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(4, locations, DIN))
    g = rng.normal(size=(4, locations, K, K))  # [N, T, K, dout], dout = K
    J = np.einsum("nti,ntkj->nkij", a, g).reshape(4, K, SIZE)
    covariance = _covariance(name)
    expected = J @ covariance.to_dense().numpy() @ J.transpose(0, 2, 1)
    layer = LayerJacobian(0, SIZE, (DIN, K), tf.constant(a), tf.constant(g), None)
    result = covariance.contract([layer], diagonal).numpy()
    np.testing.assert_allclose(result, np.diagonal(expected, axis1=1, axis2=2) if diagonal
                               else expected, **TIGHT)
    if not covariance.needs_one_factored_layer:  # the same layer's explicit Jacobian
        explicit = LayerJacobian(0, SIZE, (DIN, K), None, None, tf.constant(J))
        np.testing.assert_allclose(covariance.contract([explicit], diagonal), result, **TIGHT)


@pytest.mark.parametrize("name", NAMES)
def test_covariance_contracts_a_logits_layer_in_closed_form(name):
    a = np.random.default_rng(6).normal(size=(4, 1, DIN))
    J = np.einsum("ni,kj->nkij", a[:, 0], np.eye(K)).reshape(4, K, SIZE)  # g_k = e_k
    covariance = _covariance(name)
    expected = J @ covariance.to_dense().numpy() @ J.transpose(0, 2, 1)
    layer = LayerJacobian(0, SIZE, (DIN, K), tf.constant(a), None, None)
    np.testing.assert_allclose(covariance.contract([layer], False), expected, **TIGHT)
    prepared = covariance.for_logits_diagonal((DIN, K))
    assert prepared.for_logits_diagonal((DIN, K)) is prepared
    np.testing.assert_allclose(prepared.contract([layer], True),
                               np.diagonal(expected, axis1=1, axis2=2), **TIGHT)


@pytest.mark.parametrize("rows", [4, 9])  # rank below and above the block's size
def test_low_rank_factor_with_a_per_weight_prior_matches_dense(rows):
    rng = np.random.default_rng(7)
    block = LowRankBlock(tf.constant(rng.normal(size=(rows, SIZE))))
    H = _dense(block)
    c = tf.constant(0.7, tf.float64)
    prior = tf.constant(rng.uniform(0.5, 2.0, SIZE))
    P = 0.7 * H + np.diag(prior.numpy())
    _, expected_log_det = np.linalg.slogdet(P)
    np.testing.assert_allclose(float(block.log_det_precision(c, prior)), expected_log_det, **TIGHT)
    factor = block.factorize()
    np.testing.assert_allclose(factor.precision(c, prior).to_dense(), P, **TIGHT)
    np.testing.assert_allclose(float(factor.log_det(c, prior)), expected_log_det, **TIGHT)
    np.testing.assert_allclose(float(factor.smallest_precision_eigenvalue(c, prior)),
                               np.linalg.eigvalsh(P)[0], **TIGHT)
    np.testing.assert_allclose(factor.covariance(c, prior).to_dense(), np.linalg.inv(P), **TIGHT)
    S = factor.scale(c, prior).to_dense().numpy()
    np.testing.assert_allclose(S @ S.T, np.linalg.inv(P), **TIGHT)


def test_low_rank_block_from_eigenpairs_keeps_them():
    rng = np.random.default_rng(8)
    basis, _ = np.linalg.qr(rng.normal(size=(SIZE, 3)))
    eigenvalues = np.array([0.5, 2.0, 7.0])
    block = LowRankBlock.from_eigen(tf.constant(basis), tf.constant(eigenvalues))
    np.testing.assert_allclose(block.to_dense(), basis @ np.diag(eigenvalues) @ basis.T, **TIGHT)
    factor = block.factorize()
    np.testing.assert_allclose(factor.eigenvalues, eigenvalues, **TIGHT)
    np.testing.assert_allclose(np.abs(factor.basis.numpy().T @ basis), np.eye(3), atol=1e-10)
