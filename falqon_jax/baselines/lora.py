"""Standard LoRA on a frozen bf16 backbone (the bf16 LoRA baseline).

A linear layer ``y = x W^T`` with ``W`` of shape ``(out, in)`` (the Hugging Face / PyTorch
layout) becomes ``y = x W^T + (alpha / rank) * (x A^T) B^T`` with

* ``w`` -- ``(out, in)`` in the compute dtype (bfloat16 by default), frozen,
* ``a`` -- float32 ``(rank, in)``, trainable, initialized like PEFT
  (``kaiming_uniform_(a=sqrt(5))``, i.e. uniform in ``+-1/sqrt(in)``),
* ``b`` -- float32 ``(out, rank)``, trainable, initialized to zero.

``a`` and ``b`` are float32 master weights; :func:`apply` casts them (and ``x``) to the
compute dtype ``w.dtype`` and runs three plain matmuls whose outputs are in the compute
dtype, as a bf16 PyTorch/PEFT layer does, so the backward GEMMs are compute-dtype GEMMs too.
``w`` sits behind ``stop_gradient``: its gradient is zero and never computed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from falqon_jax import melded
from falqon_jax.baselines import adapter


@adapter.register
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraLinear(adapter.LoraAdapter):
    """Parameters of one LoRA layer (a pytree; ``rank`` and ``alpha`` are static).

    ``w (out, in)`` compute dtype, frozen; ``a (rank, in)`` and ``b (out, rank)`` float32
    (:class:`~falqon_jax.baselines.adapter.LoraAdapter`).
    """

    w: jax.Array


def check(out: int, in_features: int, rank: int) -> str | None:
    """Why an ``(out, in)`` layer cannot take a rank-``rank`` adapter, or ``None`` if it can."""
    return melded.rank_problem(out, in_features, rank)


def _backbone(w: jax.Array, dtype: jnp.dtype) -> dict[str, jax.Array]:
    """The frozen ``w (out, in)`` stored in the compute ``dtype``."""
    return dict(w=jnp.asarray(w).astype(dtype))


init = adapter.make_init(
    LoraLinear,
    _backbone,
    check,
    doc="""Wrap a float32 weight ``w (out, in)`` as a :class:`LoraLinear`.

    ``w`` is stored in ``dtype`` (the compute dtype); ``a`` is drawn from ``key`` (required),
    ``b`` is zero. Raises ``ValueError`` for a non-2-D ``w``, a missing key or a rank outside
    ``1..min(out, in)``.
    """,
)


def apply(p: LoraLinear, x: jax.Array) -> jax.Array:
    """``y = x W^T + (alpha / rank) (x A^T) B^T``.

    Args:
      p: an unstacked :class:`LoraLinear` (``w`` is 2-D).
      x: ``(..., in)``, bfloat16 or float32.

    Returns:
      ``(..., out)`` in ``x``'s dtype. Gradients flow to ``x``, ``p.a`` and ``p.b``.
    """
    adapter.check_input(p.w.shape, x)
    xc = x.astype(p.w.dtype)
    y = jnp.einsum("...i,oi->...o", xc, lax.stop_gradient(p.w))
    return (y + adapter.lora_output(xc, p)).astype(x.dtype)


def trainable(p: LoraLinear) -> LoraLinear:
    """``p``-shaped pytree of bools: ``True`` for ``a`` and ``b``, ``False`` for ``w``."""
    return adapter.trainable(p)
