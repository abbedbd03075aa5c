"""NF4 block-wise 4-bit quantization with double-quantized block scales (QLoRA).

This is the storage format of the QLoRA baseline, following the QLoRA paper and the
bitsandbytes implementation (``quantize_4bit(..., quant_type="nf4",
compress_statistics=True)``):

1. The tensor is flattened in row-major order and cut into blocks of :data:`BLOCK_SIZE`
   (64) consecutive elements. Each block is divided by its absolute maximum ``absmax`` and
   every value is rounded to the nearest of the 16 NF4 code values :data:`NF4_CODE`
   (ties go to the lower code, as in bitsandbytes). The 4-bit indices are packed two per
   byte, the first element of each pair in the high nibble.
2. Double quantization: the float32 ``absmax`` values (one per block) are centred by
   subtracting their mean ``offset`` and quantized blockwise to 8 bits: blocks of
   :data:`ABSMAX_BLOCK_SIZE` (256) centred absmaxes share one float32 scale (their absolute
   maximum), and each normalized value is rounded to the nearest entry of the signed 8-bit
   dynamic map :data:`DYNAMIC_CODE` (bitsandbytes' ``create_dynamic_map()``).

Dequantization reverses both steps: ``absmax = DYNAMIC_CODE[absmax_q] * absmax_scale +
offset`` and ``w = NF4_CODE[code] * absmax`` computed in float32, then cast.

Storage per 64 weights: 32 bytes of codes, 1 byte of ``absmax_q`` and 4/256 bytes of
``absmax_scale`` -- about 4.127 bits per weight.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_SIZE = 64
ABSMAX_BLOCK_SIZE = 256

# The NF4 data type: bitsandbytes' table (``get_4bit_type("nf4")``), the normalized quantiles
# of N(0, 1) built by ``create_normal_map(offset=0.9677083)``, sorted ascending.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)


def _dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(True, 7, 8)``).

    For each decade ``10^(i - 6)``, ``i = 0..6``, it holds the ``2^i`` midpoints of
    ``linspace(0.1, 1, 2^i + 1)`` scaled by the decade, with both signs; plus 0 and 1:
    256 sorted float32 values in ``[-0.99296875, 1]``. The values here are the exact
    midpoints rounded once to float32; bitsandbytes' table (built with float32
    ``torch.linspace``) can differ from them in the last bit.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = np.linspace(0.1, 1.0, 2**i + 1, dtype=np.float64)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
        values += list(mids) + list(-mids)
    return np.sort(np.asarray(values, np.float64)).astype(np.float32)


DYNAMIC_CODE = _dynamic_code()

# Decision boundaries of round-to-nearest: value v gets index sum(v > midpoints).
_NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
_DYNAMIC_MIDPOINTS = (DYNAMIC_CODE[1:] + DYNAMIC_CODE[:-1]) / 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4Tensor:
    """A tensor stored as NF4 with double-quantized block scales (a pytree).

    With ``n = prod(shape)`` (a multiple of 64) and ``nb = n // 64`` blocks:

    * ``codes`` -- uint8 ``(n // 2,)``: two NF4 indices per byte, element ``2k`` in the high
      nibble and ``2k + 1`` in the low nibble (row-major order of the original tensor).
    * ``absmax_q`` -- uint8 ``(nb,)``: each block's absmax, centred and quantized to an
      index into :data:`DYNAMIC_CODE`.
    * ``absmax_scale`` -- float32 ``(ceil(nb / 256),)``: one scale per 256 blocks.
    * ``absmax_offset`` -- float32 ``()``: the mean of all block absmaxes.
    * ``shape`` -- static, the original tensor shape.
    """

    codes: jax.Array
    absmax_q: jax.Array
    absmax_scale: jax.Array
    absmax_offset: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))


def check_quantizable(shape: tuple[int, ...]) -> str | None:
    """Why a tensor of this shape cannot be stored as NF4, or ``None`` if it can."""
    size = int(np.prod(shape))
    if size == 0 or size % BLOCK_SIZE:
        return (
            f"tensor of shape {tuple(shape)} has {size} elements, not a positive multiple of "
            f"the NF4 block size {BLOCK_SIZE}; leave this layer unconverted"
        )
    return None


def _nearest(values: jax.Array, midpoints: np.ndarray) -> jax.Array:
    """Index (uint8) of the nearest code for each value, ties to the lower code."""
    return jnp.searchsorted(jnp.asarray(midpoints), values, side="left").astype(jnp.uint8)


def _blockwise_absmax(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row absmax of float32 ``(nb, block)`` and a divisor safe for all-zero rows."""
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    return absmax, jnp.where(absmax > 0, absmax, jnp.float32(1.0))


@jax.jit
def quantize_nf4(w: jax.Array) -> NF4Tensor:
    """Quantize ``w`` (any shape, any float dtype, size a multiple of 64) to NF4.

    Returns an :class:`NF4Tensor`; raises ``ValueError`` if the size is not a positive
    multiple of 64. All-zero blocks are stored as zeros.
    """
    w = jnp.asarray(w)
    problem = check_quantizable(w.shape)
    if problem:
        raise ValueError(problem)
    blocks = w.astype(jnp.float32).reshape(-1, BLOCK_SIZE)
    absmax, divisor = _blockwise_absmax(blocks)
    idx = _nearest(blocks / divisor[:, None], _NF4_MIDPOINTS).reshape(-1, 2)
    codes = (idx[:, 0] << 4) | idx[:, 1]
    absmax_q, absmax_scale, offset = _double_quantize(absmax)
    return NF4Tensor(
        codes=codes,
        absmax_q=absmax_q,
        absmax_scale=absmax_scale,
        absmax_offset=offset,
        shape=tuple(w.shape),
    )


def _double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """8-bit blockwise quantization of float32 ``absmax (nb,)`` after removing its mean.

    Returns ``(absmax_q uint8 (nb,), scales float32 (ceil(nb / 256),), offset float32 ())``.
    """
    offset = jnp.mean(absmax)
    centred = absmax - offset
    n = centred.shape[0]
    padded = jnp.pad(centred, (0, -n % ABSMAX_BLOCK_SIZE)).reshape(-1, ABSMAX_BLOCK_SIZE)
    scales, divisor = _blockwise_absmax(padded)
    q = _nearest(padded / divisor[:, None], _DYNAMIC_MIDPOINTS).reshape(-1)[:n]
    return q, scales, offset


def dequantize_absmax(t: NF4Tensor) -> jax.Array:
    """The reconstructed per-block absmax of ``t``: float32 ``(n // 64,)``."""
    scales = jnp.repeat(t.absmax_scale, ABSMAX_BLOCK_SIZE)[: t.absmax_q.shape[0]]
    return jnp.asarray(DYNAMIC_CODE)[t.absmax_q] * scales + t.absmax_offset


def unpack_codes(t: NF4Tensor) -> jax.Array:
    """The NF4 indices of ``t`` in element order: uint8 ``(n,)`` with values 0..15."""
    return jnp.stack([t.codes >> 4, t.codes & 0xF], axis=-1).reshape(-1)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize_nf4(t: NF4Tensor, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """Dequantize ``t`` to an array of shape ``t.shape`` and dtype ``dtype``.

    The products ``NF4_CODE[code] * absmax`` are formed in float32 and cast once.
    """
    values = jnp.asarray(NF4_CODE)[unpack_codes(t)].reshape(-1, BLOCK_SIZE)
    return (values * dequantize_absmax(t)[:, None]).reshape(t.shape).astype(dtype)
