"""QLoRA: LoRA on an NF4 backbone with double-quantized block scales (the QLoRA baseline).

A linear layer ``y = x W^T`` with ``W`` of shape ``(out, in)`` becomes
``y = x DQ(W_nf4)^T + (alpha / rank) (x A^T) B^T`` with

* ``w`` -- the frozen backbone as an :class:`~falqon_jax.baselines.nf4.NF4Tensor` (NF4, block
  size 64, double-quantized absmax; see :mod:`falqon_jax.baselines.nf4`),
* ``a`` -- float32 ``(rank, in)`` and ``b`` -- float32 ``(out, rank)``: the trainable LoRA
  factors (PEFT init), cast to the compute dtype for the matmuls as in
  :mod:`falqon_jax.baselines.lora`,
* ``compute_dtype`` -- static name of the compute dtype (``"bfloat16"`` by default).

As in bitsandbytes' ``Linear4bit`` the backbone is dequantized to the compute dtype on the
fly in the forward pass, and dequantized again in the backward pass for ``dL/dx``: only the
NF4 storage is kept between the two, never a dequantized copy (a ``custom_vjp``).
The storage gets no gradient. Its code arrays are uint8, so ``jax.grad`` over the whole
params pytree needs ``allow_int=True`` (the uint8 leaves then get ``float0`` cotangents and
the float32 scale leaves zeros); alternatively differentiate only the leaves marked by
:func:`trainable`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from falqon_jax import melded
from falqon_jax.baselines import adapter, nf4


@adapter.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class QLoraLinear(adapter.LoraAdapter):
    """Parameters of one QLoRA layer (a pytree; ``rank``, ``alpha``, ``compute_dtype`` static).

    ``w`` is the frozen NF4 backbone of shape ``(out, in)``; ``a (rank, in)`` and
    ``b (out, rank)`` are float32 (:class:`~falqon_jax.baselines.adapter.LoraAdapter`).
    """

    w: nf4.NF4Tensor
    compute_dtype: str = dataclasses.field(metadata=dict(static=True))


def _dtype_problem(dtype: jnp.dtype) -> str | None:
    """Why ``dtype`` cannot be the compute dtype (it must be a float type), or ``None``."""
    compute = jnp.dtype(dtype)
    if not jnp.issubdtype(compute, jnp.floating):
        return f"the compute dtype must be a float type, got {compute}"
    return None


def check(out: int, in_features: int, rank: int) -> str | None:
    """Why an ``(out, in)`` layer cannot be converted, or ``None`` if it can.

    ``out * in`` must be a multiple of the NF4 block size 64 and ``rank`` in
    ``1..min(out, in)``.
    """
    return nf4.check_quantizable((out, in_features)) or melded.rank_problem(out, in_features, rank)


def _backbone(w: jax.Array, dtype: jnp.dtype) -> dict[str, Any]:
    """``w (out, in)`` quantized to an NF4 ``w`` and the compute ``dtype``'s name."""
    return dict(w=nf4.quantize_nf4(jnp.asarray(w, jnp.float32)),
                compute_dtype=jnp.dtype(dtype).name)


init = adapter.make_init(
    QLoraLinear,
    _backbone,
    check,
    dtype_problem=_dtype_problem,
    doc="""Quantize a float32 weight ``w (out, in)`` to NF4 and attach a LoRA adapter.

    ``dtype`` is the compute dtype; ``key`` (required) draws ``a``; ``b`` is zero. Raises
    ``ValueError`` if ``out * in`` is not a multiple of 64 (the NF4 block size), the rank
    is not in ``1..min(out, in)`` or ``dtype`` is not a float type.
    """,
)


def apply(p: QLoraLinear, x: jax.Array) -> jax.Array:
    """``y = x DQ(W)^T + (alpha / rank) (x A^T) B^T`` in the compute dtype.

    Args:
      p: an unstacked :class:`QLoraLinear`.
      x: ``(..., in)``, bfloat16 or float32.

    Returns:
      ``(..., out)`` in ``x``'s dtype. Gradients flow to ``x``, ``p.a`` and ``p.b``.
    """
    adapter.check_input(p.w.shape, x)
    xc = x.astype(p.compute_dtype)
    y = _nf4_matmul(p.w, xc)
    return (y + adapter.lora_output(xc, p)).astype(x.dtype)


def trainable(p: QLoraLinear) -> QLoraLinear:
    """``p``-shaped pytree of bools: ``True`` for ``a`` and ``b``, ``False`` for ``w``."""
    return adapter.trainable(p)


@jax.custom_vjp
def _nf4_matmul(w: nf4.NF4Tensor, x: jax.Array) -> jax.Array:
    """``x (..., in) @ DQ(w)^T -> (..., out)``, all in ``x``'s dtype."""
    return jnp.einsum("...i,oi->...o", x, nf4.dequantize_nf4(w, x.dtype))


def _nf4_matmul_fwd(w: nf4.NF4Tensor, x: jax.Array):
    return _nf4_matmul(w, x), w


def _nf4_matmul_bwd(w: nf4.NF4Tensor, g: jax.Array):
    dx = jnp.einsum("...o,oi->...i", g, nf4.dequantize_nf4(w, g.dtype))
    return None, dx  # None: zero cotangent for the whole NF4 storage.


_nf4_matmul.defvjp(_nf4_matmul_fwd, _nf4_matmul_bwd)
