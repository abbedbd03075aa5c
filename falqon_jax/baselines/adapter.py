"""The LoRA adapter the baselines share: the factors ``A``, ``B``, their scaling and init.

Every adapter baseline (:mod:`~falqon_jax.baselines.lora`,
:mod:`~falqon_jax.baselines.fp8_lora`, :mod:`~falqon_jax.baselines.qlora`) stores a frozen
backbone of its own plus the same trainable adapter:

* ``a`` -- float32 ``(rank, in)``, initialized like PEFT (``kaiming_uniform_(a=sqrt(5))``,
  i.e. uniform in ``+-1/sqrt(in)``),
* ``b`` -- float32 ``(out, rank)``, initialized to zero,
* ``rank`` and ``alpha`` (static): the update is ``(alpha / rank) B A``.

A baseline's params class subclasses :class:`LoraAdapter`, declares only its backbone fields
and is registered with :func:`register`, which keeps the pytree order of the backbone first:
leaves ``(backbone..., a, b)``, static ``(rank, alpha, own static fields...)``. Its ``init``
comes from :func:`make_init`, given only how the backbone is built from ``w`` and ``dtype``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

_P = TypeVar("_P")
_A = TypeVar("_A", bound="LoraAdapter")
_T = TypeVar("_T", bound=type)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraAdapter:
    """The trainable part of a LoRA layer: ``a (rank, in)`` and ``b (out, rank)`` float32.

    A base class: subclasses add the frozen backbone and are registered with :func:`register`.
    """

    a: jax.Array
    b: jax.Array
    rank: int = dataclasses.field(metadata=dict(static=True))
    alpha: float = dataclasses.field(metadata=dict(static=True))

    @property
    def scaling(self) -> float:
        """The LoRA multiplier ``alpha / rank``."""
        return self.alpha / self.rank


def register(cls: _T) -> _T:
    """Register a :class:`LoraAdapter` dataclass as a pytree, backbone first.

    Leaves: the class's own (backbone) data fields, then ``a``, ``b``; static: ``rank``,
    ``alpha``, then the class's own static fields (those with ``metadata=dict(static=True)``).
    """
    adapter = {f.name for f in dataclasses.fields(LoraAdapter)}
    own = [f for f in dataclasses.fields(cls) if f.name not in adapter]
    return jax.tree_util.register_dataclass(
        cls,
        data_fields=[f.name for f in own if not f.metadata.get("static")] + ["a", "b"],
        meta_fields=["rank", "alpha"] + [f.name for f in own if f.metadata.get("static")],
    )


def make_init(
    params_type: Callable[..., _A],
    backbone: Callable[[jax.Array, Any], dict[str, Any]],
    check: Callable[[int, int, int], str | None],
    *,
    doc: str,
    dtype_problem: Callable[[Any], str | None] | None = None,
) -> Callable[..., _A]:
    """A baseline's ``init(w, rank, *, alpha=16.0, key=None, dtype=jnp.bfloat16)``.

    The returned ``init`` (docstring ``doc``, named as a function of ``params_type``'s module)
    checks the float32 weight ``w (out, in)`` and ``rank`` (:func:`new_adapter`: the shape,
    ``check(out, in, rank)``, then ``dtype_problem(dtype)`` if given, then the ``key``), draws
    the adapter and returns ``params_type(**backbone(w, dtype), a=..., b=..., rank=...,
    alpha=...)``: ``backbone`` builds the frozen fields in the compute ``dtype``.
    """

    def init(
        w: jax.Array,
        rank: int,
        *,
        alpha: float = 16.0,
        key: jax.Array | None = None,
        dtype: jnp.dtype = jnp.bfloat16,
    ) -> _A:
        def problem(out: int, in_features: int, r: int) -> str | None:
            return check(out, in_features, r) or (dtype_problem and dtype_problem(dtype))

        fields = new_adapter(w, rank, alpha=alpha, key=key, check=problem)
        return params_type(**backbone(w, dtype), **fields)

    init.__doc__ = doc
    init.__module__ = params_type.__module__
    init.__qualname__ = "init"
    return init


def new_adapter(
    w: jax.Array,
    rank: int,
    *,
    alpha: float,
    key: jax.Array | None,
    check: Callable[[int, int, int], str | None],
) -> dict[str, Any]:
    """Check a weight ``w (out, in)`` and ``rank``, then draw the adapter for it.

    Returns ``a``, ``b``, ``rank``, ``alpha`` as keyword arguments of a :class:`LoraAdapter`
    subclass (see :func:`adapter_fields`). Raises ``ValueError`` for a non-2-D ``w``, the
    problem ``check(out, in, rank)`` names, or a missing ``key``.
    """
    shape = jnp.shape(w)
    if len(shape) != 2:
        raise ValueError(f"init expects a 2-D weight (out, in), got shape {shape}")
    out, in_features = shape
    problem = check(out, in_features, rank)
    if problem:
        raise ValueError(problem)
    return adapter_fields(key, out, in_features, rank, alpha)


def adapter_fields(
    key: jax.Array | None, out: int, in_features: int, rank: int, alpha: float
) -> dict[str, Any]:
    """PEFT's LoRA init as keyword arguments of a :class:`LoraAdapter` subclass.

    ``a`` float32 ``(rank, in)`` ~ U(+-1/sqrt(in)) drawn from ``key`` (required:
    ``kaiming_uniform_(a=sqrt(5))`` has bound ``sqrt(6 / (1 + 5)) / sqrt(fan_in)``), ``b``
    float32 zeros ``(out, rank)``, ``rank`` as an int and ``alpha`` as a float.
    """
    if key is None:
        raise ValueError("init needs a PRNG key for the LoRA factor A: pass key=jax.random.key(n)")
    bound = 1.0 / float(in_features) ** 0.5
    a = jax.random.uniform(key, (rank, in_features), jnp.float32, -bound, bound)
    b = jnp.zeros((out, rank), jnp.float32)
    return dict(a=a, b=b, rank=int(rank), alpha=float(alpha))


def check_input(w_shape: tuple[int, ...], x: jax.Array) -> None:
    """Reject stacked weights (``w_shape`` not 2-D) and inputs whose last axis is not ``in``."""
    if len(w_shape) != 2:
        raise ValueError(
            f"apply takes one layer; got stacked weights of shape {w_shape} "
            "(map over the leading axes, e.g. with nn.scan or jax.lax.scan)"
        )
    if x.shape[-1] != w_shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects {w_shape[1]}")


def lora_output(xc: jax.Array, p: LoraAdapter) -> jax.Array:
    """``scaling * (xc A^T) B^T`` in ``xc``'s dtype: ``(..., in) -> (..., out)``.

    ``p.a (rank, in)`` and ``p.b (out, rank)`` are cast to the compute dtype ``xc.dtype``.
    """
    ax = jnp.einsum("...i,ri->...r", xc, p.a.astype(xc.dtype))
    lora = jnp.einsum("...r,or->...o", ax, p.b.astype(xc.dtype))
    return lora * jnp.asarray(p.scaling, xc.dtype)


def trainable(p: _P) -> _P:
    """``p``-shaped pytree of bools: ``True`` for ``a`` and ``b``, ``False`` for the rest."""
    frozen = jax.tree.map(lambda _: False, p)
    return dataclasses.replace(frozen, a=True, b=True)
