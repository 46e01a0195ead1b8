"""Sums over examples of Kronecker products, ``sum_n (a_n b_n^T) ⊗ M_n``, as one matmul, and
Gram matrices ``rows^T rows`` from their upper blocks (:func:`gram`).

The dense curvature of layers with Kronecker structure is made of such sums: ``a_n``, ``b_n``
are two layers' input rows, ``M_n [o, p]`` a per-example matrix over their outputs. Entry
``((i, o), (j, p))`` of the ``[da o, db p]`` block is ``sum_n a_ni b_nj M_nop``, the matmul
``(a ⊗ b)^T M`` over examples: ``N da db o p`` multiply-adds. A symmetric block (``b = a`` and
every ``M_n`` symmetric) has only ``d (d + 1) / 2`` distinct pairs ``i <= j`` and
``o (o + 1) / 2`` pairs ``o <= p``; computing just those does a quarter of the work. Forming
the input pairs costs memory traffic, though (``d^2`` numbers an example, each worth about
:data:`INPUT_PAIR_COST` multiply-adds), so when ``o`` is small (a last layer: many features,
few classes) only the output pairs are packed, ``[d, o (o + 1) / 2 d]``.

A sum is kept *compact* (``[da db, o p]``, or *packed* when symmetric) while batches are
added up, and laid out as the block once, at the end.

Example:
    >>> import numpy as np, tensorflow as tf
    >>> a = tf.constant([[1.0, 2.0], [0.5, -1.0]], tf.float64)
    >>> m = tf.constant([[[2.0, 1.0], [1.0, 3.0]], [[1.0, 0.0], [0.0, 1.0]]], tf.float64)
    >>> block = symmetric_kron_block(symmetric_kron_sum(a, m), 2, 2)
    >>> expected = sum(np.kron(np.outer(a[n], a[n]), m[n]) for n in range(2))
    >>> bool(np.allclose(block, expected))
    True
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

INPUT_PAIR_COST = 67
"""Multiply-adds that forming one input pair ``a_ni a_nj`` costs in memory traffic (measured
in float32 on 2 AVX-512 cores: packed sums for ``(d, o)`` = (257, 10), (785, 5), (51, 50))."""


def kron_sum(a: tf.Tensor, b: tf.Tensor, m: tf.Tensor) -> tf.Tensor:
    """``sum_n (a_n b_n^T) ⊗ M_n`` compact, ``[da db, o p]`` (``a [N, da]``, ``b [N, db]``,
    ``m [N, o, p]``); :func:`kron_block` lays it out."""
    a, b = tf.transpose(a), tf.transpose(b)  # examples last: [da, N], [db, N]
    pairs = tf.reshape(a[:, None, :] * b[None, :, :], [-1, tf.shape(a)[1]])
    return tf.matmul(pairs, tf.reshape(m, [tf.shape(m)[0], -1]))


def kron_block(compact: tf.Tensor, da: int, db: int, o: int, p: int) -> tf.Tensor:
    """The ``[da o, db p]`` block of a :func:`kron_sum`."""
    block = tf.transpose(tf.reshape(compact, [da, db, o, p]), [0, 2, 1, 3])
    return tf.reshape(block, [da * o, db * p])


def symmetric_kron_sum(a: tf.Tensor, m: tf.Tensor, pack_inputs: bool | None = None) -> tf.Tensor:
    """``sum_n (a_n a_n^T) ⊗ M_n`` packed, for symmetric ``m [N, o, o]``:
    ``[d (d + 1) / 2, o (o + 1) / 2]`` if ``pack_inputs`` (default: :func:`packs_inputs`), else
    ``[d, o (o + 1) / 2 d]``; :func:`symmetric_kron_block` lays it out."""
    outputs = upper_triangle(tf.transpose(m, [1, 2, 0]))  # [o (o + 1) / 2, N]
    if packs_inputs(a.shape[-1], m.shape[-1]) if pack_inputs is None else pack_inputs:
        inputs = tf.transpose(a)  # examples last: [d, N]
        pairs = upper_triangle(inputs[:, None, :] * inputs[None, :, :])
        return tf.matmul(pairs, outputs, transpose_b=True)
    scaled = tf.transpose(outputs)[:, :, None] * a[:, None, :]  # [N, o (o + 1) / 2, d]
    return tf.matmul(a, tf.reshape(scaled, [tf.shape(a)[0], -1]), transpose_a=True)


def symmetric_kron_block(packed: tf.Tensor, d: int, o: int,
                         pack_inputs: bool | None = None) -> tf.Tensor:
    """The ``[d o, d o]`` block of a :func:`symmetric_kron_sum` (with the same ``pack_inputs``)."""
    if packs_inputs(d, o) if pack_inputs is None else pack_inputs:
        rows = tf.gather(packed, _packed_position(d), axis=0)
        return kron_block(tf.gather(rows, _packed_position(o), axis=1), d, d, o, o)
    entries = tf.gather(tf.reshape(packed, [d, -1, d]), _packed_position(o), axis=1)
    block = tf.transpose(tf.reshape(entries, [d, o, o, d]), [0, 1, 3, 2])
    return tf.reshape(block, [d * o, d * o])


def symmetric_sum_numbers(d: int, o: int) -> int:
    """Numbers per example that :func:`symmetric_kron_sum` holds for ``a [N, d]``, ``m [N, o, o]``
    (input pairs and packed outputs, or outputs scaled by the inputs)."""
    o_pairs = o * (o + 1) // 2
    return d * d + d * (d + 1) // 2 + o_pairs if packs_inputs(d, o) else (d + 1) * o_pairs


def packs_inputs(d: int, o: int) -> bool:
    """Whether :func:`symmetric_kron_sum` packs the input pairs too: when the multiply-adds it
    saves exceed the cost of forming the pairs.

    Example:
        >>> packs_inputs(51, 50), packs_inputs(257, 10)     # a hidden layer; a last layer
        (True, False)
    """
    d_pairs, o_pairs = d * (d + 1) // 2, o * (o + 1) // 2
    return d_pairs * o_pairs + INPUT_PAIR_COST * d * d < d * d * o_pairs


GRAM_BLOCK = 128
"""Columns per block of :func:`gram` (at most :data:`GRAM_BANDS` blocks): narrower products run
too far below the matmul's peak rate to pay for the work they save."""

GRAM_BANDS = 4
"""The most column blocks :func:`gram` cuts (measured best for 512 to 1024 columns)."""

GRAM_BAND_BYTES = 32 * 2**20
"""Rows of at most this many bytes get :func:`gram`'s bands (whose column blocks are copies,
up to 2.5 times the rows in 4 bands); larger ones one full matmul, without a copy."""


def gram(rows: tf.Tensor, bands: int | None = None) -> tf.Tensor:
    """``rows^T rows`` ``[d, d]`` for ``rows [n, d]``, from the products on and above the diagonal.

    The columns are cut into ``bands`` blocks (default: blocks of at least :data:`GRAM_BLOCK`
    columns, at most :data:`GRAM_BANDS`); band ``i`` is one matmul of block ``i`` with the
    columns from block ``i`` on, the blocks below the diagonal are transposes. With ``q`` bands
    this is ``(q + 1) / 2q`` of the full matmul's multiply-adds, and exactly symmetric. Measured
    in float32 on one AVX-512 thread for ``[5120, 512]`` rows (a G factor: 20 outputs, 256
    examples), 0.8 of the full matmul's time at ``q = 4`` (0.9 at ``q = 2``; narrower blocks
    lose more to the matmul's rate than they save; bands of one transposed copy of the rows
    took 1.6 times as long). The column blocks are copies: rows larger than
    :data:`GRAM_BAND_BYTES` (a convolution's patches) get the one full matmul instead.

    Example:
        >>> x = tf.constant([[1.0, 2.0, 0.0], [3.0, -1.0, 2.0]])
        >>> gram(x, bands=2).numpy().tolist()
        [[10.0, -1.0, 6.0], [-1.0, 5.0, -2.0], [6.0, -2.0, 4.0]]
    """
    d = int(rows.shape[-1])
    q = min(GRAM_BANDS, d // GRAM_BLOCK) if bands is None else min(bands, d)
    if q < 2:
        return tf.matmul(rows, rows, transpose_a=True)
    small = tf.size(rows, tf.int64) * rows.dtype.size <= GRAM_BAND_BYTES
    return tf.cond(small, lambda: _banded_gram(rows, q),
                   lambda: tf.matmul(rows, rows, transpose_a=True))


def _banded_gram(rows: tf.Tensor, q: int) -> tf.Tensor:
    """:func:`gram` in ``q`` bands."""
    d = int(rows.shape[-1])
    size = -(-d // q)
    band = [tf.matmul(rows[:, i * size:(i + 1) * size], rows[:, i * size:], transpose_a=True)
            for i in range(q)]  # band i: [size, d - i size]
    return tf.concat([
        tf.concat([tf.transpose(band[j][:, (i - j) * size:(i - j + 1) * size]) for j in range(i)]
                  + [band[i]], axis=1)
        for i in range(q)
    ], axis=0)


def upper_triangle(m: tf.Tensor) -> tf.Tensor:
    """Entries ``(i, j)``, ``i <= j``, of ``m [d, d, N]``, row by row: ``[d (d + 1) / 2, N]``.

    The examples go last, so that each entry is one contiguous copy.
    """
    d = m.shape[0]
    index = tf.range(d)
    upper = tf.where(tf.reshape(index[:, None] <= index[None, :], [-1]))[:, 0]
    return tf.reshape(tf.gather(tf.reshape(m, [d * d, -1]), upper), [d * (d + 1) // 2, -1])


def _packed_position(d: int) -> np.ndarray:
    """Where entry ``(i, j)`` of a symmetric ``[d, d]`` matrix is in its :func:`upper_triangle`,
    for all ``d * d`` entries in row-major order (row ``i`` of the triangle starts at
    ``i d - i (i - 1) / 2``)."""
    i, j = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
    low, high = np.minimum(i, j), np.maximum(i, j)
    return (low * d - low * (low - 1) // 2 + high - low).reshape(-1)
