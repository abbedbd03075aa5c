"""FP8 numerics: per-tensor dynamic scaling, saturating casts and a scaled FP8 matmul.

Conventions used throughout the project:

* E4M3 (``jnp.float8_e4m3fn``, max 448) holds weights and activations, E5M2
  (``jnp.float8_e5m2``, max 57344) holds gradients.
* Every scale is a *dequantization* multiplier: ``q.astype(float32) * scale`` is the
  real tensor. Quantization divides by it. Scales are float32 scalars.
* Dynamic per-tensor scaling picks ``scale = amax / fmax`` so the largest magnitude of the
  tensor lands on the format's largest finite value. Values are clipped to ``[-fmax, fmax]``
  before the cast (saturating), so finite inputs never give inf or NaN. An all-zero tensor
  gets ``scale = 1``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
FP8_DTYPES = (jnp.dtype(E4M3), jnp.dtype(E5M2))

# The smallest scale we ever use: keeps ``x / scale`` finite for denormal amax values.
_MIN_SCALE = float(jnp.finfo(jnp.float32).tiny)


def fp8_max(dtype: jnp.dtype) -> float:
    """Largest finite value of an FP8 format (448 for E4M3, 57344 for E5M2)."""
    return float(jnp.finfo(dtype).max)


def scale_from_amax(amax: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Dequantization scale (float32 scalar) that maps ``amax`` onto ``dtype``'s max.

    Returns 1.0 for a zero (or non-finite) amax so all-zero tensors stay zero and never
    divide by zero.
    """
    amax = jnp.asarray(amax, jnp.float32)
    scale = jnp.maximum(amax / fp8_max(dtype), _MIN_SCALE)
    usable = (amax > 0) & jnp.isfinite(amax)
    return jnp.where(usable, scale, jnp.float32(1.0))


def compute_scale(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Per-tensor dynamic dequantization scale of ``x`` for ``dtype`` (float32 scalar).

    The largest magnitude is taken in ``x``'s own dtype (exact in any float format), so no
    float32 copy of ``x`` is made for it."""
    return scale_from_amax(abs_max(x), dtype)


def abs_max(x: jax.Array) -> jax.Array:
    """``max(|x|)`` as a float32 scalar, taken in ``x``'s own dtype (exact in any float
    format, and no float32 copy of ``x``).

    Row maxima first, kept apart from the final maximum by an optimization barrier: XLA
    would otherwise merge the two reductions into one, and then cannot fuse the row
    maxima into the kernel that produces ``x`` (e.g. an RMSNorm), which must then write
    ``|x|`` out for a reduction of its own.
    """
    rows = jnp.max(jnp.abs(x), axis=-1) if x.ndim > 1 else jnp.abs(x)
    return jnp.max(lax.optimization_barrier(rows)).astype(jnp.float32)


def cast_to_fp8(x: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Saturating cast of ``x / scale`` to ``dtype`` (round to nearest even).

    ``x`` may have any shape and float dtype; the division happens in float32.
    """
    limit = fp8_max(dtype)
    scaled = x.astype(jnp.float32) / scale
    return jnp.clip(scaled, -limit, limit).astype(dtype)


def quantize(x: jax.Array, dtype: jnp.dtype = E4M3) -> tuple[jax.Array, jax.Array]:
    """Quantize ``x`` with a dynamic per-tensor scale.

    Args:
      x: float array of any shape.
      dtype: ``E4M3`` or ``E5M2``.

    Returns:
      ``(q, scale)``: ``q`` has ``x``'s shape and dtype ``dtype``; ``scale`` is the float32
      dequantization scalar, so ``dequantize(q, scale)`` approximates ``x``.
    """
    scale = compute_scale(x, dtype)
    return cast_to_fp8(x, scale, dtype), scale


def quantize_gemm_result(x: jax.Array, dtype: jnp.dtype = E4M3) -> tuple[jax.Array, jax.Array]:
    """:func:`quantize` for the float32 result of an FP8 GEMM (e.g. ``A x`` before it feeds
    the next FP8 GEMM). Same values; an optimization barrier keeps the two apart.

    XLA's cuBLASLt FP8 rewrite fuses a GEMM result's amax and its FP8 cast into the GEMM
    itself; with dynamic scaling the cast's scale is computed from that very amax, so the
    fused GEMM would depend on its own output, and compilation fails ("A cycle is detected
    while visiting instruction ...", seen with jax 0.10.2 for an H100).
    """
    return quantize(lax.optimization_barrier(x), dtype)


def dequantize(q: jax.Array, scale: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """``q.astype(float32) * scale``, cast to ``dtype``."""
    return (q.astype(jnp.float32) * scale).astype(dtype)


def fp8_dot(
    a8: jax.Array,
    a_scale: jax.Array,
    b8: jax.Array,
    b_scale: jax.Array,
    dimension_numbers: lax.DotDimensionNumbers,
    out_dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Scaled FP8 GEMM: ``dot_general(a8, b8) * a_scale * b_scale`` in ``out_dtype``.

    ``a8`` and ``b8`` are float8 arrays (either format); XLA lowers the ``dot_general`` with
    float8 operands to an FP8 tensor-core GEMM on Hopper/Ada GPUs (cuBLASLt or Triton),
    which accumulates in float32 and writes its result in ``out_dtype``; the product of the
    per-tensor scales multiplies it in ``out_dtype``. For float32 that is one rounding of
    the exact sum. For bfloat16 the GEMM's sum, the scale and their product are each
    rounded to bfloat16 (relative error at most about ``3 * 2**-8``, against ``2**-4`` for
    an E4M3 value), and in exchange no float32 ``(rows, cols)`` tensor is written and read
    back: both GEMM back ends then write the scaled bfloat16 result in one pass. On CPU the
    same program runs with upcast values, just not fast.
    """
    if a8.dtype not in FP8_DTYPES or b8.dtype not in FP8_DTYPES:
        raise TypeError(f"fp8_dot needs float8 operands, got {a8.dtype} and {b8.dtype}")
    acc = lax.dot_general(a8, b8, dimension_numbers, preferred_element_type=out_dtype)
    return acc * jnp.asarray(a_scale * b_scale, jnp.float32).astype(out_dtype)


def _finite_max_bits(dtype: jnp.dtype) -> int:
    """The bit pattern (as uint8) of ``dtype``'s largest finite value."""
    return int(np.array(fp8_max(dtype), dtype=jnp.dtype(dtype)).view(np.uint8))


def step_away_from_zero(q: jax.Array) -> jax.Array:
    """Distance from each FP8 value of ``q`` to the next representable one away from zero
    (float32, same shape); at the largest finite value, the step below it."""
    dtype = q.dtype
    top = _finite_max_bits(dtype)
    bits = jax.lax.bitcast_convert_type(q, jnp.uint8) & jnp.uint8(0x7F)  # clear the sign
    mag = jax.lax.bitcast_convert_type(bits, dtype)
    at_top = bits >= top
    other = jnp.where(at_top, bits - 1, bits + 1).astype(jnp.uint8)
    neighbour = jax.lax.bitcast_convert_type(other, dtype).astype(jnp.float32)
    return jnp.abs(neighbour - mag.astype(jnp.float32))


def round_to(
    x: jax.Array, dtype: jnp.dtype, mode: str = "nearest", key: jax.Array | None = None
) -> jax.Array:
    """Saturating cast of float32 ``x`` (already in quantized units) to ``dtype``.

    ``mode="nearest"``: round to nearest even. ``mode="stochastic"``: round to one of the two
    neighbouring representable values, up with probability equal to the fraction of the step
    (unbiased: the expectation is ``x`` clipped to the format's range); needs ``key``.
    """
    limit = fp8_max(dtype)
    x = jnp.clip(x.astype(jnp.float32), -limit, limit)
    if mode == "nearest":
        return x.astype(dtype)
    if mode != "stochastic":
        raise ValueError(f'mode must be "nearest" or "stochastic", got {mode!r}')
    if key is None:
        raise ValueError('mode="stochastic" needs a PRNG key')
    mag = jnp.abs(x)
    near = mag.astype(dtype)
    near_f = near.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(near, jnp.uint8)
    above = near_f > mag  # rounded up: the lower neighbour is one code below
    lo_bits = jnp.where(above, bits - 1, bits).astype(jnp.uint8)
    hi_bits = jnp.where(above, bits, jnp.minimum(bits + 1, _finite_max_bits(dtype)))
    lo = jax.lax.bitcast_convert_type(lo_bits, dtype).astype(jnp.float32)
    hi = jax.lax.bitcast_convert_type(hi_bits.astype(jnp.uint8), dtype).astype(jnp.float32)
    gap = hi - lo
    p_up = jnp.where(gap > 0, (mag - lo) / jnp.where(gap > 0, gap, 1.0), 0.0)
    up = jax.random.uniform(key, x.shape, jnp.float32) < p_up
    chosen = jnp.where(up, hi_bits.astype(jnp.uint8), lo_bits)
    signed = jnp.where(x < 0, chosen | jnp.uint8(0x80), chosen)  # FP8 sign: the top bit
    return jax.lax.bitcast_convert_type(signed.astype(jnp.uint8), dtype)
