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
from typing import TypeVar

import jax
import jax.numpy as jnp
from jax import lax

_P = TypeVar("_P")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraLinear:
    """Parameters of one LoRA layer (a pytree; ``rank`` and ``alpha`` are static).

    ``w (out, in)`` compute dtype, frozen; ``a (rank, in)`` and ``b (out, rank)`` float32.
    """

    w: jax.Array
    a: jax.Array
    b: jax.Array
    rank: int = dataclasses.field(metadata=dict(static=True))
    alpha: float = dataclasses.field(metadata=dict(static=True))

    @property
    def scaling(self) -> float:
        """The LoRA multiplier ``alpha / rank``."""
        return self.alpha / self.rank


def init(
    w: jax.Array,
    rank: int,
    *,
    alpha: float = 16.0,
    key: jax.Array | None = None,
    dtype: jnp.dtype = jnp.bfloat16,
) -> LoraLinear:
    """Wrap a float32 weight ``w (out, in)`` as a :class:`LoraLinear`.

    ``w`` is stored in ``dtype`` (the compute dtype); ``a`` is drawn from ``key`` (required),
    ``b`` is zero. Raises ``ValueError`` for a non-2-D ``w``, a missing key or a rank outside
    ``1..min(out, in)``.
    """
    out, in_features = _weight_shape(w)
    problem = check(out, in_features, rank)
    if problem:
        raise ValueError(problem)
    a, b = _init_adapter(key, out, in_features, rank)
    return LoraLinear(w=jnp.asarray(w).astype(dtype), a=a, b=b, rank=int(rank), alpha=float(alpha))


def apply(p: LoraLinear, x: jax.Array) -> jax.Array:
    """``y = x W^T + (alpha / rank) (x A^T) B^T``.

    Args:
      p: an unstacked :class:`LoraLinear` (``w`` is 2-D).
      x: ``(..., in)``, bfloat16 or float32.

    Returns:
      ``(..., out)`` in ``x``'s dtype. Gradients flow to ``x``, ``p.a`` and ``p.b``.
    """
    _check_input(p.w.shape, x)
    xc = x.astype(p.w.dtype)
    y = jnp.einsum("...i,oi->...o", xc, lax.stop_gradient(p.w))
    return (y + _adapter(xc, p.a, p.b, p.scaling)).astype(x.dtype)


def check(out: int, in_features: int, rank: int) -> str | None:
    """Why an ``(out, in)`` layer cannot take a rank-``rank`` adapter, or ``None`` if it can."""
    return _rank_problem(out, in_features, rank)


def trainable(p: LoraLinear) -> LoraLinear:
    """``p``-shaped pytree of bools: ``True`` for ``a`` and ``b``, ``False`` for ``w``."""
    return _adapter_mask(p)


# --------------------------------------------------------------------------------------
# Helpers shared with the other adapter baselines.


def _weight_shape(w: jax.Array) -> tuple[int, int]:
    """``(out, in)`` of a 2-D weight; ``ValueError`` for any other rank."""
    shape = jnp.shape(w)
    if len(shape) != 2:
        raise ValueError(f"init expects a 2-D weight (out, in), got shape {shape}")
    return shape[0], shape[1]


def _rank_problem(out: int, in_features: int, rank: int) -> str | None:
    """Why ``rank`` is not a valid LoRA rank for an ``(out, in)`` layer, or ``None``."""
    if rank <= 0 or rank > min(out, in_features):
        return (
            f"rank must be in 1..{min(out, in_features)} for a ({out}, {in_features}) layer, "
            f"got {rank}"
        )
    return None


def _init_adapter(
    key: jax.Array | None, out: int, in_features: int, rank: int
) -> tuple[jax.Array, jax.Array]:
    """PEFT's LoRA init: ``a`` float32 ``(rank, in)`` ~ U(+-1/sqrt(in)), ``b`` zeros.

    ``kaiming_uniform_(a=sqrt(5))`` has bound ``sqrt(6 / (1 + 5)) / sqrt(fan_in)``.
    """
    if key is None:
        raise ValueError("init needs a PRNG key for the LoRA factor A: pass key=jax.random.key(n)")
    bound = 1.0 / float(in_features) ** 0.5
    a = jax.random.uniform(key, (rank, in_features), jnp.float32, -bound, bound)
    return a, jnp.zeros((out, rank), jnp.float32)


def _check_input(w_shape: tuple[int, ...], x: jax.Array) -> None:
    """Reject stacked weights and inputs whose last axis is not ``in``."""
    if len(w_shape) != 2:
        raise ValueError(
            f"apply takes one layer; got stacked weights of shape {w_shape} "
            "(map over the leading axes, e.g. with nn.scan or jax.lax.scan)"
        )
    if x.shape[-1] != w_shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects {w_shape[1]}")


def _adapter(xc: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """``scaling * (xc A^T) B^T`` in ``xc``'s dtype: ``(..., in) -> (..., out)``.

    ``a (rank, in)`` and ``b (out, rank)`` are cast to the compute dtype ``xc.dtype``.
    """
    ax = jnp.einsum("...i,ri->...r", xc, a.astype(xc.dtype))
    return jnp.einsum("...r,or->...o", ax, b.astype(xc.dtype)) * jnp.asarray(scaling, xc.dtype)


def _adapter_mask(p: _P) -> _P:
    """All-``False`` copy of a params dataclass with ``a`` and ``b`` set to ``True``."""
    frozen = jax.tree.map(lambda _: False, p)
    return dataclasses.replace(frozen, a=True, b=True)
