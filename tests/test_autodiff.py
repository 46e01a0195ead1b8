"""Tests of laplace_tf.autodiff against closed forms and finite differences (float64).

Cases are declarative tables: each builder returns ``(f, x, expected)`` with ``expected``
written out by hand, so the same tables drive ``hessian``, ``hvp`` and ``tf.function``.
"""

from __future__ import annotations

from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from laplace_tf.autodiff import hessian, hvp, jacobian
from laplace_tf.testing import finite_difference_hessian

F64 = tf.float64
EXACT = {"rtol": 1e-12, "atol": 1e-12}


def const(value) -> tf.Tensor:
    return tf.constant(value, F64)


def contract(h: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``H . v`` over all axes of ``v`` (the Hessian-vector product of a shaped input)."""
    return np.tensordot(h, v, axes=v.ndim)


# --- the classic GradientTape examples ------------------------------------------------------

CLASSIC = {
    # d2/dx2 (x^2 + 2x + 1) = 2, a scalar Hessian for a scalar x
    "polynomial_at_2": (lambda x: x**2 + 2.0 * x + 1.0, 2.0, np.array(2.0)),
    # f = x0^2 + x0 x1 + x1^2: H = [[2, 1], [1, 2]] everywhere
    "two_variable_quadratic": (
        lambda x: x[0] ** 2 + x[0] * x[1] + x[1] ** 2,
        [3.0, -1.0],
        np.array([[2.0, 1.0], [1.0, 2.0]]),
    ),
    # |x| has gradient sign(x), whose derivative TF defines as 0: zero, not None
    "abs_at_0": (tf.abs, 0.0, np.array(0.0)),
}


@pytest.mark.parametrize("name", CLASSIC)
def test_classic_examples(name):
    f, x0, expected = CLASSIC[name]
    h = hessian(f, const(x0))
    assert h is not None and h.shape == expected.shape
    np.testing.assert_allclose(h.numpy(), expected, **EXACT)


# --- closed-form Hessians -------------------------------------------------------------------


def quadratic_form():
    a = np.random.default_rng(1).normal(size=(4, 4))  # not symmetric
    return (
        (lambda x: tf.tensordot(x, tf.linalg.matvec(const(a), x), 1)),
        const([1.0, -2, 0.5, 3]),
        a + a.T,
    )


def rosenbrock():
    x = np.array([0.3, -1.2, 0.8, 1.5])

    def f(x):
        return tf.reduce_sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)

    h = np.zeros((4, 4))
    for i in range(3):  # term i couples x_i and x_{i+1}
        h[i, i] += 1200 * x[i] ** 2 - 400 * x[i + 1] + 2
        h[i + 1, i + 1] += 200
        h[i, i + 1] = h[i + 1, i] = -400 * x[i]
    return f, const(x), h


def log_sum_exp():
    x = np.array([0.5, -1.0, 2.0, 0.0, 1.0])
    p = np.exp(x) / np.exp(x).sum()
    return tf.reduce_logsumexp, const(x), np.diag(p) - np.outer(p, p)


def trace_quadratic():
    # f(X) = tr(X^T A X), X: 3x2; d2f / dX_ab dX_cd = (A + A^T)_ac delta_bd
    rng = np.random.default_rng(2)
    a, x = rng.normal(size=(3, 3)), rng.normal(size=(3, 2))
    f = lambda x: tf.linalg.trace(tf.transpose(x) @ const(a) @ x)  # noqa: E731
    return f, const(x), np.einsum("ac,bd->abcd", a + a.T, np.eye(2))


def squares_times_matrix():
    # f(X) = sum(X**2 @ B), X: 2x3; d2f / dX_ab dX_cd = 2 delta_ac delta_bd sum_j B_bj
    rng = np.random.default_rng(3)
    b, x = rng.normal(size=(3, 4)), rng.normal(size=(2, 3))
    f = lambda x: tf.reduce_sum(x**2 @ const(b))  # noqa: E731
    return f, const(x), 2 * np.einsum("ac,bd,b->abcd", np.eye(2), np.eye(3), b.sum(axis=1))


ANALYTIC = {
    f.__name__: f
    for f in (quadratic_form, rosenbrock, log_sum_exp, trace_quadratic, squares_times_matrix)
}


@pytest.mark.parametrize("case", ANALYTIC)
def test_hessian_closed_form(case):
    f, x, expected = ANALYTIC[case]()
    h = hessian(f, x)
    assert h.shape == expected.shape
    np.testing.assert_allclose(h.numpy(), expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("case", ANALYTIC)
def test_hvp_equals_hessian_times_v(case):
    f, x, expected = ANALYTIC[case]()
    v = np.random.default_rng(4).normal(size=x.shape)
    np.testing.assert_allclose(
        hvp(f, x, const(v)).numpy(), contract(expected, v), rtol=1e-12, atol=1e-10
    )


# --- a list of inputs with cross blocks -----------------------------------------------------
# f(a, b) = sum_ij a_ij b_j^2 with a: 2x3, b: 3. Blocks:
#   H_aa = 0,  H_ab[i,j,k] = 2 b_j delta_jk,  H_ba = H_ab transposed,  H_bb[j,k] = 2 delta_jk sum_i a_ij

A0 = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])
B0 = np.array([2.0, -0.5, 1.5])


def cross(xs):
    return tf.reduce_sum(xs[0] * xs[1] ** 2)


def cross_blocks() -> list[list[np.ndarray]]:
    h_ab = 2 * np.einsum("i,jk,j->ijk", np.ones(2), np.eye(3), B0)
    return [
        [np.zeros((2, 3, 2, 3)), h_ab],
        [h_ab.transpose(2, 0, 1), 2 * np.diag(A0.sum(axis=0))],
    ]


def flat_matrix(blocks) -> np.ndarray:
    sizes = [2 * 3, 3]
    return np.block(
        [
            [blk.reshape(sizes[i], sizes[j]) for j, blk in enumerate(row)]
            for i, row in enumerate(blocks)
        ]
    )


def test_list_blocks_and_flat():
    xs = [const(A0), const(B0)]
    h = hessian(cross, xs)
    expected = cross_blocks()
    for i in range(2):
        for j in range(2):
            assert h[i][j].shape == expected[i][j].shape, (i, j)
            np.testing.assert_allclose(h[i][j].numpy(), expected[i][j], **EXACT)
    np.testing.assert_allclose(
        hessian(cross, xs, flat=True).numpy(), flat_matrix(expected), **EXACT
    )


def test_variables_closed_over():
    a, b = tf.Variable(A0), tf.Variable(B0)
    h = hessian(lambda _: tf.reduce_sum(a * b**2), [a, b], flat=True)
    np.testing.assert_allclose(h.numpy(), flat_matrix(cross_blocks()), **EXACT)


def test_keras_variables_of_a_model_closed_over():
    """``model.trainable_variables`` are Keras variables, not ``tf.Variable``s: the Hessian of
    a loss that calls the model is the brute-force one over the flat vector, not zeros."""
    import keras

    from laplace_tf.likelihoods import get_likelihood
    from laplace_tf.testing import brute_force_hessian, subset_of

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,), dtype="float64"),
                              keras.layers.Dense(4, "tanh", dtype="float64"),
                              keras.layers.Dense(2, dtype="float64")])
    x, y = np.random.default_rng(0).normal(size=(5, 3)), np.array([0, 1, 1, 0, 1])
    likelihood = get_likelihood("classification")
    targets = likelihood.prepare_targets(y, 2, tf.float64)
    weights = model.trainable_variables
    assert not isinstance(weights[0], tf.Variable)

    def loss(_):
        return likelihood.nll(model(x), targets)

    expected = brute_force_hessian(subset_of(model), likelihood, x, targets)
    np.testing.assert_allclose(hessian(loss, weights, flat=True), expected, **EXACT)
    v = [tf.ones(w.shape, F64) for w in weights]
    got = np.concatenate([p.numpy().ravel() for p in hvp(loss, weights, v)])
    np.testing.assert_allclose(got, expected.sum(axis=1), **EXACT)


def test_hvp_of_list():
    v = [np.random.default_rng(5).normal(size=(2, 3)), np.array([1.0, -1.0, 2.0])]
    out = hvp(cross, [tf.Variable(A0), tf.Variable(B0)], [const(v[0]), const(v[1])])
    h = cross_blocks()
    for i in range(2):
        np.testing.assert_allclose(
            out[i].numpy(), contract(h[i][0], v[0]) + contract(h[i][1], v[1]), **EXACT
        )


def test_hvp_through_a_gather_is_dense_with_repeated_rows_summed():
    table = tf.Variable(np.arange(6.0).reshape(3, 2))
    f = lambda t: tf.reduce_sum(tf.gather(t, [0, 2, 2]) ** 3)  # noqa: E731
    v = tf.ones((3, 2), F64)
    out = hvp(f, table, v)
    # H is diagonal: 6 t per use of a row (row 2 is read twice)
    expected = 6 * np.arange(6.0).reshape(3, 2) * np.array([[1.0], [0.0], [2.0]])
    assert isinstance(out, tf.Tensor)
    np.testing.assert_allclose(out.numpy(), expected, **EXACT)


def test_a_keras_variable_returned_by_f_and_a_numpy_chunk_size():
    dense = keras.layers.Dense(2, dtype="float64")
    dense.build((None, 3))
    got = jacobian(lambda w: dense.kernel, dense.kernel)
    np.testing.assert_allclose(np.reshape(got.numpy(), (6, 6)), np.eye(6), **EXACT)
    np.testing.assert_allclose(hessian(SUM_SQUARES, X3_CONST, chunk_size=np.int64(2)).numpy(),
                               2 * np.eye(3), **EXACT)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 5, 8, 9, 50])  # P = 9
def test_chunking_gives_the_same_values(chunk_size):
    xs = [const(A0), const(B0)]
    smooth = lambda xs: tf.reduce_sum(tf.tanh(xs[0] * xs[1])) * tf.reduce_sum(tf.sin(xs[1]))  # noqa: E731
    full = hessian(smooth, xs, flat=True)
    np.testing.assert_allclose(
        hessian(smooth, xs, flat=True, chunk_size=chunk_size).numpy(), full.numpy(), **EXACT
    )


# --- random smooth functions against central finite differences -----------------------------

NP_OPS = SimpleNamespace(tanh=np.tanh, sin=np.sin, exp=np.exp, sum=np.sum, mv=lambda m, x: m @ x)
TF_OPS = SimpleNamespace(
    tanh=tf.tanh, sin=tf.sin, exp=tf.exp, sum=tf.reduce_sum, mv=tf.linalg.matvec
)

SMOOTH = {  # one definition per function, evaluated with numpy (for FD) and TensorFlow
    "tanh_mlp": lambda o, x, m, n: o.sum(o.tanh(o.mv(n, o.tanh(o.mv(m, x))))),
    "sin_times_tanh": lambda o, x, m, n: o.sum(o.sin(o.mv(m, x)) * o.tanh(o.mv(n, x))),
    "exp_sin_quadratic": lambda o, x, m, n: (
        o.sum(o.exp(0.5 * o.sin(o.mv(m, x)))) * o.sum(o.mv(n, x) ** 2)
    ),
}


@pytest.mark.parametrize("name", SMOOTH)
def test_smooth_functions_match_finite_differences(name):
    rng = np.random.default_rng(6)
    m, n, x = rng.normal(size=(5, 5)) / 2, rng.normal(size=(5, 5)) / 2, rng.normal(size=5)
    fn = SMOOTH[name]
    reference = finite_difference_hessian(lambda x: fn(NP_OPS, x, m, n), x)
    h = hessian(lambda x: fn(TF_OPS, x, const(m), const(n)), const(x))
    np.testing.assert_allclose(h.numpy(), reference, rtol=1e-6, atol=1e-6)


# --- Jacobians -----------------------------------------------------------------------------

W0 = np.array([[1.0, 0.5, -0.3, 2.0], [0.2, -1.0, 0.7, 0.1], [-0.4, 0.3, 1.2, -0.6]])
X0 = np.array([0.3, -0.2, 0.5, 1.0])
M0 = np.array([[1.0, 2.0], [-0.5, 3.0]])

JACOBIANS = {
    # tanh(W x): diag(1 - tanh(W x)^2) W
    "tanh_layer": (
        lambda x: tf.tanh(tf.linalg.matvec(const(W0), x)),
        const(X0),
        (1 - np.tanh(W0 @ X0) ** 2)[:, None] * W0,
    ),
    # X @ X with X 2x2: d(XX)_ij / dX_kl = delta_ik X_lj + X_ik delta_jl
    "matrix_square": (
        lambda x: x @ x,
        const(M0),
        np.einsum("ik,lj->ijkl", np.eye(2), M0) + np.einsum("ik,jl->ijkl", M0, np.eye(2)),
    ),
    # A x for the list [A, x]: J_A[i,k,l] = delta_ik x_l, J_x = A
    "list_matvec": (
        lambda xs: tf.linalg.matvec(xs[0], xs[1]),
        [const(W0), const(X0)],
        [np.einsum("ik,l->ikl", np.eye(3), X0), W0],
    ),
}


@pytest.mark.parametrize("name", JACOBIANS)
def test_jacobian_closed_form(name):
    f, x, expected = JACOBIANS[name]
    got = jacobian(f, x)
    as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    for g, e in zip(as_list(got), as_list(expected), strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g.numpy(), e, **EXACT)


# --- eager == tf.function, dtypes, fallback -------------------------------------------------

GRAPH_CASES = {
    "hessian_list_chunked": lambda xs: hessian(cross, xs, chunk_size=2, flat=True),
    "hvp_list": lambda xs: hvp(cross, xs, [tf.ones_like(x) for x in xs]),
    "jacobian_list": lambda xs: jacobian(lambda xs: xs[0] * xs[1] ** 3, xs),
}


@pytest.mark.parametrize("name", GRAPH_CASES)
def test_eager_equals_tf_function(name):
    xs = [tf.Variable(A0), tf.Variable(B0)]
    eager = tf.nest.flatten(GRAPH_CASES[name](xs))
    compiled = tf.nest.flatten(tf.function(GRAPH_CASES[name])(xs))
    for e, c in zip(eager, compiled, strict=True):
        np.testing.assert_allclose(c.numpy(), e.numpy(), **EXACT)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_output_dtype_follows_x(dtype):
    # f = sum(x^3): gradient 3 x^2, Hessian diag(6 x), Jacobian of x^3 is diag(3 x^2)
    x = tf.constant([1.0, -2.0, 0.5], dtype)
    cube = lambda x: tf.reduce_sum(x**3)  # noqa: E731
    v = tf.constant([1.0, 1.0, 2.0], dtype)
    results = {
        "hessian": (hessian(cube, x), np.diag(6 * x.numpy())),
        "hvp": (hvp(cube, x, v), 6 * x.numpy() * v.numpy()),
        "jacobian": (jacobian(lambda x: x**3, x), np.diag(3 * x.numpy() ** 2)),
    }
    for name, (got, expected) in results.items():
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, err_msg=name)


def test_loop_fallback_when_pfor_fails(monkeypatch):
    xs = [const(A0), const(B0)]
    reference = hessian(cross, xs, flat=True)
    original = tf.GradientTape.jacobian

    def jacobian_without_pfor(self, target, sources, **kwargs):
        if kwargs["experimental_use_pfor"]:
            raise ValueError("pfor disabled by the test")
        return original(self, target, sources, **kwargs)

    monkeypatch.setattr(tf.GradientTape, "jacobian", jacobian_without_pfor)
    with pytest.warns(RuntimeWarning, match="sequential loop") as record:
        looped = hessian(cross, xs, flat=True, chunk_size=4)  # three chunks, one warning
    assert len(record) == 1
    np.testing.assert_allclose(looped.numpy(), reference.numpy(), **EXACT)


# --- unconnected inputs ---------------------------------------------------------------------


def only_first(xs):
    return tf.reduce_sum(xs[0] ** 2)


def test_unconnected_zero():
    a, b = const([1.0, 2.0]), const([3.0, 4.0, 5.0])
    h = hessian(only_first, [a, b])
    np.testing.assert_array_equal(h[0][0].numpy(), 2 * np.eye(2))
    for blk, shape in [(h[0][1], (2, 3)), (h[1][0], (3, 2)), (h[1][1], (3, 3))]:
        np.testing.assert_array_equal(blk.numpy(), np.zeros(shape))
    np.testing.assert_array_equal(hvp(only_first, [a, b], [a, b])[1].numpy(), np.zeros(3))
    np.testing.assert_array_equal(jacobian(lambda xs: xs[0], [a, b])[1].numpy(), np.zeros((2, 3)))


@pytest.mark.parametrize(
    "fn", [hessian, lambda f, x, **kw: jacobian(lambda xs: tf.stack([f(xs)]), x, **kw)]
)
def test_unconnected_raise_names_the_input(fn):
    with pytest.raises(ValueError, match=r"`x\[1\]`"):
        fn(only_first, [const([1.0, 2.0]), const([3.0])], unconnected="raise")


def test_linear_function_is_connected_with_zero_hessian():
    # f depends on x, so "raise" must not raise; its second derivative is exactly zero
    h = hessian(
        lambda x: tf.reduce_sum(const([1.0, -2.0]) * x), const([0.5, 0.5]), unconnected="raise"
    )
    np.testing.assert_array_equal(h.numpy(), np.zeros((2, 2)))


# --- bad input ------------------------------------------------------------------------------

X3_CONST = tf.constant([1.0, 2.0, 3.0], tf.float64)
SUM_SQUARES = lambda x: tf.reduce_sum(x**2)  # noqa: E731

X3 = tf.constant([1.0, 2.0, 3.0], F64)
SUM = tf.reduce_sum

BAD_INPUTS = {
    "f_not_callable": (lambda: hessian(3.0, X3), TypeError, ["`f`", "callable", "float"]),
    "jacobian_f_not_callable": (lambda: jacobian("f", X3), TypeError, ["`f`", "callable"]),
    "hessian_non_scalar_f": (
        lambda: hessian(lambda x: x**2, X3),
        ValueError,
        ["`f`", "scalar", "(3,)"],
    ),
    "hvp_non_scalar_f": (
        lambda: hvp(lambda x: x**2, X3, X3),
        ValueError,
        ["`f`", "scalar", "(3,)"],
    ),
    "integer_x": (
        lambda: hessian(SUM, tf.constant([1, 2])),
        TypeError,
        ["`x`", "int32", "float64"],
    ),
    "integer_x_in_list": (
        lambda: hessian(SUM, [X3, np.arange(2)]),
        TypeError,
        ["`x[1]`", "int64", "cast"],
    ),
    "mixed_dtypes_in_list": (
        lambda: hessian(cross, [X3, tf.ones(3)]),
        TypeError,
        ["`x[1]`", "float32", "float64"],
    ),
    "v_wrong_shape": (lambda: hvp(SUM, X3, tf.ones(4, F64)), ValueError, ["`v`", "(3,)", "(4,)"]),
    "v_wrong_structure": (lambda: hvp(cross, [X3, X3], X3), ValueError, ["`v`", "list", "(3,)"]),
    "v_wrong_dtype": (lambda: hvp(SUM, X3, tf.ones(3)), TypeError, ["`v`", "float32", "float64"]),
    "unknown_unconnected": (
        lambda: hessian(SUM, X3, unconnected="ignore"),
        ValueError,
        ["`unconnected`", "'zero'", "'raise'", "'ignore'"],
    ),
    "jacobian_unknown_unconnected": (
        lambda: jacobian(SUM, X3, unconnected=None),
        ValueError,
        ["`unconnected`"],
    ),
    "nested_list": (lambda: hessian(cross, [[X3], X3]), TypeError, ["`x[0]`", "list", "flat"]),
    "dict_x": (lambda: hessian(SUM, {"a": X3}), TypeError, ["`x`", "dict", "flat list"]),
    "empty_x": (lambda: hessian(SUM, tf.zeros((0,), F64)), ValueError, ["`x`", "no entries"]),
    "ragged_x": (lambda: hessian(SUM, tf.ragged.constant([[1.0], [2.0, 3.0]])), TypeError,
                 ["`x`", "RaggedTensor", "to_tensor"]),
    "chunk_size_zero": (
        lambda: hessian(SUM, X3, chunk_size=0),
        ValueError,
        ["`chunk_size`", "positive"],
    ),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_raises_a_clear_error(name):
    call, error, fragments = BAD_INPUTS[name]
    with pytest.raises(error) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
