"""Sums of per-example Kronecker products against ``numpy.kron`` summed example by example."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from laplace_tf.curvature._kron_sums import (
    gram,
    kron_block,
    kron_sum,
    packs_inputs,
    symmetric_kron_block,
    symmetric_kron_sum,
)


def _brute(a, b, m):
    return sum(np.kron(np.outer(a[n], b[n]), m[n]) for n in range(len(a)))


def _symmetric(rng, n, o):
    m = rng.normal(size=(n, o, o))
    return m + m.transpose(0, 2, 1)


@pytest.mark.parametrize(("n", "da", "db", "o", "p"), [(1, 1, 1, 1, 1), (5, 3, 4, 2, 3), (7, 6, 2, 5, 1)])
def test_kron_sum_equals_summed_kron_products(n, da, db, o, p):
    rng = np.random.default_rng(n + da)
    a, b, m = rng.normal(size=(n, da)), rng.normal(size=(n, db)), rng.normal(size=(n, o, p))
    block = kron_block(kron_sum(tf.constant(a), tf.constant(b), tf.constant(m)), da, db, o, p)
    np.testing.assert_allclose(block.numpy(), _brute(a, b, m), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pack_inputs", [True, False, None])
@pytest.mark.parametrize(("n", "d", "o"), [(1, 1, 1), (4, 3, 2), (6, 5, 4), (3, 2, 7)])
def test_symmetric_kron_sum_equals_summed_kron_products(n, d, o, pack_inputs):
    rng = np.random.default_rng(10 * n + d)
    a, m = rng.normal(size=(n, d)), _symmetric(rng, n, o)
    packed = symmetric_kron_sum(tf.constant(a), tf.constant(m), pack_inputs)
    size = d * (d + 1) // 2 if pack_inputs else d
    if pack_inputs is not None:
        assert packed.shape[0] == size
    block = symmetric_kron_block(packed, d, o, pack_inputs)
    np.testing.assert_allclose(block.numpy(), _brute(a, a, m), rtol=1e-12, atol=1e-12)


def test_symmetric_sums_of_two_batches_add_up():
    """Packed sums add entry by entry: two halves give the block of all examples."""
    rng = np.random.default_rng(3)
    a, m = rng.normal(size=(8, 4)), _symmetric(rng, 8, 3)
    for pack_inputs in (True, False):
        halves = [symmetric_kron_sum(tf.constant(a[s]), tf.constant(m[s]), pack_inputs)
                  for s in (slice(0, 5), slice(5, 8))]
        block = symmetric_kron_block(halves[0] + halves[1], 4, 3, pack_inputs)
        np.testing.assert_allclose(block.numpy(), _brute(a, a, m), rtol=1e-12, atol=1e-12)


def test_inputs_are_packed_only_when_outputs_are_many():
    assert packs_inputs(51, 50) and packs_inputs(4, 20)
    assert not packs_inputs(257, 10) and not packs_inputs(785, 5) and not packs_inputs(2, 2)


@pytest.mark.parametrize("bands", [None, 1, 2, 3, 4, 9])
@pytest.mark.parametrize(("n", "d"), [(1, 1), (5, 7), (9, 4), (3, 300)])
def test_gram_from_upper_bands_equals_full_product(n, d, bands):
    """Bands of unequal width (7 columns in 3 or 4), more bands than columns, and the default
    (two bands of 150 columns for d = 300)."""
    rows = np.random.default_rng(n + d).normal(size=(n, d))
    np.testing.assert_allclose(gram(tf.constant(rows), bands).numpy(), rows.T @ rows,
                               rtol=1e-12, atol=1e-12)
