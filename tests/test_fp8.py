"""FP8 numerics against ml_dtypes' rounding (an independent implementation of the formats)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from falqon_jax import fp8
from tests import reference as ref

FORMATS = [(fp8.E4M3, ref.E4M3, 448.0), (fp8.E5M2, ref.E5M2, 57344.0)]


@pytest.mark.parametrize("jdtype,ndtype,maxval", FORMATS)
def test_max_values(jdtype, ndtype, maxval):
    assert fp8.fp8_max(jdtype) == maxval == float(ml_dtypes.finfo(ndtype).max)


@pytest.mark.parametrize("jdtype,ndtype,maxval", FORMATS)
def test_quantize_matches_ml_dtypes_bit_for_bit(jdtype, ndtype, maxval):
    rng = np.random.default_rng(0)
    # Mix scales so values span normals, subnormals and exact midpoints after scaling.
    x = (rng.standard_normal(4096) * np.exp(rng.uniform(-12, 4, 4096))).astype(np.float32)
    q, s = fp8.quantize(jnp.asarray(x), jdtype)
    q_ref, s_ref = ref.quantize(x, ndtype)
    assert q.dtype == jdtype and s.dtype == jnp.float32
    assert float(s) == float(s_ref)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), q_ref.view(np.uint8))


@pytest.mark.parametrize("jdtype,ndtype,maxval", FORMATS)
def test_round_trip_error_is_half_an_ulp(jdtype, ndtype, maxval):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    q, s = fp8.quantize(jnp.asarray(x), jdtype)
    back = np.asarray(fp8.dequantize(q, s), np.float64)
    # Round-to-nearest: error <= half the spacing at |x|/s, i.e. 2^-(mantissa+1) relative
    # for normals, half the smallest subnormal step absolutely.
    info = ml_dtypes.finfo(ndtype)
    rel = 2.0 ** -(info.nmant + 1)
    tol = np.maximum(rel * np.abs(x), 0.5 * float(info.smallest_subnormal) * float(s))
    assert np.all(np.abs(back - x) <= tol * (1 + 1e-6))
    # The largest magnitude lands exactly on the format's max.
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == maxval


@pytest.mark.parametrize("jdtype,ndtype,maxval", FORMATS)
def test_saturation_never_overflows(jdtype, ndtype, maxval):
    x = jnp.asarray([1.0, -2.0, 3.0], jnp.float32)
    # A deliberately too-small scale: values beyond the max saturate instead of becoming inf/nan.
    q = fp8.cast_to_fp8(x, jnp.float32(1e-6), jdtype)
    vals = np.asarray(q.astype(jnp.float32))
    np.testing.assert_array_equal(vals, [maxval, -maxval, maxval])


@pytest.mark.parametrize("jdtype,ndtype,maxval", FORMATS)
@pytest.mark.parametrize(
    "x",
    [np.zeros((8, 16)), np.full((4,), 1e-45), np.array([3e38, -3e38]), np.array([0.0, -0.0])],
    ids=["zeros", "denormal-amax", "huge", "signed-zeros"],
)
def test_extreme_inputs_stay_finite(jdtype, ndtype, maxval, x):
    x = jnp.asarray(x, jnp.float32)
    q, s = fp8.quantize(x, jdtype)
    assert np.isfinite(float(s)) and float(s) > 0
    back = np.asarray(fp8.dequantize(q, s))
    assert np.all(np.isfinite(back))
    if not np.any(np.asarray(x)):
        assert float(s) == 1.0 and not np.any(back)


def test_bfloat16_input():
    x = jnp.asarray(np.linspace(-3, 3, 97), jnp.bfloat16)
    q, s = fp8.quantize(x, fp8.E4M3)
    q_ref, s_ref = ref.quantize(np.asarray(x.astype(jnp.float32)), ref.E4M3)
    assert float(s) == float(s_ref)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), q_ref.view(np.uint8))


def test_fp8_dot_applies_both_scales_with_f32_accumulation():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((32, 48)).astype(np.float32)
    b = rng.standard_normal((16, 48)).astype(np.float32) * 5
    a8, sa = fp8.quantize(jnp.asarray(a), fp8.E4M3)
    b8, sb = fp8.quantize(jnp.asarray(b), fp8.E5M2)
    got = fp8.fp8_dot(a8, sa, b8, sb, (((1,), (1,)), ((), ())))
    assert got.dtype == jnp.float32
    a_ref, sa_ref = ref.quantize(a, ref.E4M3)
    b_ref, sb_ref = ref.quantize(b, ref.E5M2)
    factor = float(sa_ref) * float(sb_ref)
    want = ref.f64(a_ref) @ ref.f64(b_ref).T * factor
    bound = ref.summation_bound(np.abs(ref.f64(a_ref)), np.abs(ref.f64(b_ref)).T, 48, factor)
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= bound)


def test_fp8_dot_rejects_wide_operands():
    with pytest.raises(TypeError, match="float8"):
        fp8.fp8_dot(jnp.ones((2, 2)), 1.0, jnp.ones((2, 2)), 1.0, (((1,), (0,)), ((), ())))


def test_dot_general_keeps_float8_operands():
    """The lowered program feeds float8 tensors straight into dot_general (the FP8 GEMM)."""
    a8 = jnp.ones((16, 32), fp8.E4M3)
    dims = (((1,), (1,)), ((), ()))
    text = jax.jit(lambda a, b: fp8.fp8_dot(a, 1.0, b, 1.0, dims)).lower(a8, a8).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert len(dots) == 1
    assert "(tensor<16x32xf8E4M3FN>, tensor<16x32xf8E4M3FN>) -> tensor<16x16xf32>" in dots[0]
