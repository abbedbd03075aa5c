"""LoRA with every GEMM in FP8 (the torchao float8 training + PEFT LoRA baseline).

A linear layer ``y = x W^T`` with ``W`` of shape ``(out, in)`` becomes
``y = x W^T + s (x A^T) B^T`` with ``s = alpha / rank`` and

* ``w8`` -- float8_e4m3fn ``(out, in)``: the frozen backbone, quantized once at init,
* ``scale`` -- float32 scalar, its dequantization multiplier,
* ``a`` -- float32 ``(rank, in)`` and ``b`` -- float32 ``(out, rank)``: the trainable LoRA
  factors (PEFT init: ``a`` uniform in ``+-1/sqrt(in)``, ``b`` zero).

As in torchao's float8 training with tensorwise dynamic scaling, every GEMM -- the backbone
GEMM and both adapter GEMMs, forward and backward -- is an FP8 GEMM (float32 accumulation)
whose operands are quantized on the fly with a per-tensor amax scale (:func:`fp8.quantize`):
E4M3 for activations and weights, E5M2 for gradients. With ``T`` tokens and ``r = rank``,
one forward + backward performs these casts:

======================  =========  ==============  ====================================
tensor                  shape      format          used by
======================  =========  ==============  ====================================
``x``                   (T, in)    E4M3            fwd ``x W^T``, ``x A^T``; bwd ``dA``
``A``                   (r, in)    E4M3            fwd ``x A^T``; bwd ``dx`` (adapter)
``x A^T``               (T, r)     E4M3            fwd ``(x A^T) B^T``; bwd ``dB``
``B``                   (out, r)   E4M3            fwd ``(x A^T) B^T``; bwd ``d(x A^T)``
``g = dL/dy``           (T, out)   E5M2            bwd ``dx`` (backbone), ``dB``, ``d(x A^T)``
``d(x A^T)``            (T, r)     E5M2            bwd ``dA``, ``dx`` (adapter)
======================  =========  ==============  ====================================

Six casts (two of them large: ``x`` and ``g``) and eight FP8 GEMMs: three forward
(``x W^T``, ``x A^T``, ``(x A^T) B^T``) and five backward (``dx = g W + d(xA^T) A``,
``dB = s g^T (x A^T)``, ``d(x A^T) = s g B``, ``dA = d(xA^T)^T x``). The backbone is not
re-cast (it is stored in FP8) and gets no gradient (zero cotangent, no GEMM).

Each tensor is cast once and the FP8 copy is reused by every GEMM that reads it, forward
and backward (the FP8 copies of ``x``, ``A``, ``x A^T``, ``B`` are the saved residuals);
with per-tensor scales, casting the same tensor again would give the same bits. The LoRA
multiplier ``s`` is folded into the dequantization scale of ``g`` instead of casting
``s * g`` separately. A stack of independent float8 modules (backbone, ``lora_A``,
``lora_B``, as torchao + PEFT builds it) casts ``x`` and ``g`` once per module that reads
them, so it does at least these casts; this baseline is the leaner variant of that recipe.
The adapter intermediate ``x A^T`` stays in float32 between its GEMM and its cast.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from falqon_jax import fp8, melded
from falqon_jax.baselines import adapter


@adapter.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8LoraLinear(adapter.LoraAdapter):
    """Parameters of one FP8 LoRA layer (a pytree; ``rank`` and ``alpha`` are static).

    ``w8`` float8_e4m3fn ``(out, in)`` and ``scale`` float32 ``()`` are frozen; ``a``
    float32 ``(rank, in)`` and ``b`` float32 ``(out, rank)`` are trained
    (:class:`~falqon_jax.baselines.adapter.LoraAdapter`).
    """

    w8: jax.Array
    scale: jax.Array


def check(out: int, in_features: int, rank: int) -> str | None:
    """Why an ``(out, in)`` layer cannot be converted, or ``None`` if it can.

    ``out`` and ``in`` must be multiples of 16 (FP8 GEMMs) and ``rank`` in
    ``1..min(out, in)``; the same rule as :func:`falqon_jax.melded.check_convertible`.
    """
    return melded.check_convertible(out, in_features, rank)


def _backbone(w: jax.Array, dtype: jnp.dtype) -> dict[str, jax.Array]:
    """``w (out, in)`` quantized once to float8_e4m3fn ``w8`` and its float32 ``scale ()``.

    ``dtype`` is unused: the backbone is stored in FP8 whatever the compute dtype.
    """
    w8, scale = fp8.quantize(jnp.asarray(w, jnp.float32), fp8.E4M3)
    return dict(w8=w8, scale=scale)


init = adapter.make_init(
    Fp8LoraLinear,
    _backbone,
    check,
    doc="""Quantize a float32 weight ``w (out, in)`` to E4M3 and attach a LoRA adapter.

    ``key`` (required) draws ``a``; ``b`` is zero. ``dtype`` is accepted for a signature
    shared with the other baselines and unused: GEMM operands are FP8, accumulation is
    float32, and ``apply`` returns ``x``'s dtype. Raises ``ValueError`` if ``out`` or ``in``
    is not a multiple of 16 (FP8 GEMM requirement) or the rank is not in ``1..min(out, in)``.
    """,
)


def apply(p: Fp8LoraLinear, x: jax.Array) -> jax.Array:
    """``y = x W^T + (alpha / rank) (x A^T) B^T`` with FP8 GEMMs forward and backward.

    Args:
      p: an unstacked :class:`Fp8LoraLinear` (``w8`` is 2-D).
      x: ``(..., in)``, bfloat16 or float32.

    Returns:
      ``(..., out)`` in ``x``'s dtype. Gradients flow to ``x``, ``p.a`` and ``p.b``;
      ``w8`` and ``scale`` get zero cotangents.
    """
    adapter.check_input(p.w8.shape, x)
    tokens = x.reshape(-1, x.shape[-1])
    a = p.a.astype(jnp.float32)
    b = p.b.astype(jnp.float32)
    y = _fp8_lora_matmul(p.scaling, p.w8, p.scale, a, b, tokens)
    return y.reshape(x.shape[:-1] + (y.shape[-1],))


def trainable(p: Fp8LoraLinear) -> Fp8LoraLinear:
    """``p``-shaped pytree of bools: ``True`` for ``a`` and ``b``, ``False`` otherwise."""
    return adapter.trainable(p)


# --------------------------------------------------------------------------------------
# Forward and backward.

_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # (M, K) x (N, K) -> (M, N)
_CONTRACT_INNER = (((1,), (0,)), ((), ()))  # (M, K) x (K, N) -> (M, N)
_CONTRACT_TOKENS = (((0,), (0,)), ((), ()))  # (T, M) x (T, N) -> (M, N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_lora_matmul(
    scaling: float,
    w8: jax.Array,
    scale: jax.Array,
    a: jax.Array,
    b: jax.Array,
    x: jax.Array,
) -> jax.Array:
    """``x (T, in) -> y (T, out)`` in ``x``'s dtype; ``a``, ``b`` float32."""
    return _forward(scaling, w8, scale, a, b, x)[0]


def _forward(scaling, w8, scale, a, b, x):
    """Three FP8 GEMMs; returns ``y`` and the FP8 residuals the backward reuses."""
    x8, x_scale = fp8.quantize(x, fp8.E4M3)
    a8, a_scale = fp8.quantize(a, fp8.E4M3)
    b8, b_scale = fp8.quantize(b, fp8.E4M3)
    # Each GEMM writes its (T, out) result in x's dtype, as torchao's float8 linears do.
    base = fp8.fp8_dot(x8, x_scale, w8, scale, _CONTRACT_LAST, x.dtype)  # (T, out)
    ax = fp8.fp8_dot(x8, x_scale, a8, a_scale, _CONTRACT_LAST)  # (T, r) float32
    ax8, ax_scale = fp8.quantize_gemm_result(ax, fp8.E4M3)
    # s (x A^T) B^T: the LoRA multiplier s folded into the GEMM's scale
    lora = fp8.fp8_dot(ax8, ax_scale * scaling, b8, b_scale, _CONTRACT_LAST, x.dtype)
    return base + lora, (w8, scale, x8, x_scale, a8, a_scale, ax8, ax_scale, b8, b_scale)


def _fp8_lora_fwd(scaling, w8, scale, a, b, x):
    return _forward(scaling, w8, scale, a, b, x)


def _fp8_lora_bwd(scaling, residuals, g):
    w8, scale, x8, x_scale, a8, a_scale, ax8, ax_scale, b8, b_scale = residuals
    g8, g_scale = fp8.quantize(g, fp8.E5M2)
    lora_g_scale = g_scale * scaling  # dL/d(lora output) = scaling * g, same FP8 payload
    db = fp8.fp8_dot(g8, lora_g_scale, ax8, ax_scale, _CONTRACT_TOKENS)  # (out, r)
    dax = fp8.fp8_dot(g8, lora_g_scale, b8, b_scale, _CONTRACT_INNER)  # (T, r)
    dax8, dax_scale = fp8.quantize_gemm_result(dax, fp8.E5M2)
    da = fp8.fp8_dot(dax8, dax_scale, x8, x_scale, _CONTRACT_TOKENS)  # (r, in)
    dx = fp8.fp8_dot(g8, g_scale, w8, scale, _CONTRACT_INNER, g.dtype)  # (T, in)
    dx = dx + fp8.fp8_dot(dax8, dax_scale, a8, a_scale, _CONTRACT_INNER, g.dtype)
    # None: symbolic zero cotangents for the frozen backbone ``w8`` and its ``scale``.
    return None, None, da, db, dx


_fp8_lora_matmul.defvjp(_fp8_lora_fwd, _fp8_lora_bwd)
