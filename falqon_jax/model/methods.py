"""Registry of linear-layer methods: how a ``y = x W^T`` layer is stored, run and trained.

A method converts a float32 weight ``w`` of shape ``(out, in)`` (the Hugging Face layout)
into a params pytree and runs it:

* ``init(w, rank, *, alpha, key, dtype) -> params``
* ``apply(params, x) -> y``: ``x`` is ``(..., in)``, ``y`` is ``(..., out)`` in ``x``'s dtype
* optionally ``apply_shared(layers, x) -> (y, ...)``: several layers on the same ``x``
* ``trainable(params) -> bool pytree`` of the same structure: which leaves an optimizer trains
* ``check(out, in, rank) -> str | None``: why a layer of that shape cannot be converted

Built in: ``full`` (a dense weight, trained), ``frozen`` (a dense weight, not trained; used
for layers a method does not target) and ``falqon`` (:mod:`falqon_jax.melded`). ``lora``,
``fp8_lora`` and ``qlora`` live in their own modules (``falqon_jax.baselines.lora`` ...),
imported on first use. Such a module provides ``init``, ``apply``, ``trainable`` and optionally
``check``; FP8 methods without a ``check`` use :func:`falqon_jax.melded.check_convertible`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from falqon_jax import melded, rules, sharding


class MethodImpl(Protocol):
    """What a method's implementation (a module or an object) provides."""

    def init(self, w: jax.Array, rank: int, *, alpha: float, key: jax.Array, dtype: Any) -> Any: ...

    def apply(self, params: Any, x: jax.Array) -> jax.Array: ...

    def trainable(self, params: Any) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Method:
    """A named linear-layer method.

    ``source`` is the implementation: an object with ``init``/``apply``/``trainable``, or a
    module name imported on first use. ``fp8`` marks methods that need FP8-GEMM-friendly
    shapes (every dimension a multiple of 16).
    """

    name: str
    source: str | MethodImpl
    fp8: bool = False

    def impl(self) -> MethodImpl | ModuleType:
        """The implementation; raises ``ImportError`` naming the method if it is missing."""
        if not isinstance(self.source, str):
            return self.source
        try:
            return importlib.import_module(self.source)
        except ModuleNotFoundError as err:
            if err.name is None or not (self.source + ".").startswith(err.name + "."):
                raise
            raise ImportError(
                f"linear method {self.name!r} is registered but its module {self.source!r} "
                "is not available"
            ) from err

    def check(self, out: int, in_features: int, rank: int) -> str | None:
        """Why a ``(out, in)`` layer cannot use this method at ``rank``; ``None`` if it can."""
        custom = getattr(self.impl(), "check", None)
        if custom is not None:
            return custom(out, in_features, rank)
        if self.fp8:
            return melded.check_convertible(out, in_features, rank)
        return None

    def init(self, w: jax.Array, rank: int, *, alpha: float, key: jax.Array, dtype: Any) -> Any:
        """Convert float32 ``w`` ``(out, in)`` into this method's params pytree.

        Raises ``ValueError`` (naming the method) if :meth:`check` rejects the shape.
        """
        if w.ndim != 2:
            raise ValueError(f"{self.name}: expected a 2-D weight (out, in), got {w.shape}")
        problem = self.check(w.shape[0], w.shape[1], rank)
        if problem:
            raise ValueError(f"{self.name}: {problem}")
        return self.impl().init(w, rank, alpha=alpha, key=key, dtype=dtype)

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        """``(..., in) -> (..., out)`` in ``x``'s dtype, for one (unstacked) layer."""
        return self.impl().apply(params, x)

    def apply_shared(self, layers: Sequence[Any], x: jax.Array) -> tuple[jax.Array, ...]:
        """:meth:`apply` of several layers (params pytrees) to the same ``x``, one output
        each. An implementation's own ``apply_shared`` may share work between them (FALQON
        sums their ``dL/dx`` inside its FP8 GEMMs); otherwise each layer runs alone."""
        shared = getattr(self.impl(), "apply_shared", None)
        if shared is not None:
            return tuple(shared(layers, x))
        return tuple(self.apply(params, x) for params in layers)

    def trainable(self, params: Any) -> Any:
        """Bool pytree shaped like ``params``: ``True`` where the optimizer trains."""
        return self.impl().trainable(params)

    @property
    def melded(self) -> bool:
        """Whether its layers are FALQON's melded layers (FP8 ``[W; A]`` and ``b``), whose
        ``b`` an update rule (:mod:`falqon_jax.rules`) trains."""
        return isinstance(self.source, _FalqonImpl)


# --------------------------------------------------------------------------------------
# Built-in implementations.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dense:
    """A plain weight ``w`` of shape ``(..., out, in)`` in the compute dtype."""

    w: jax.Array


_CONTRACT_IN = (((1,), (1,)), ((), ()))  # (T, in) x (out, in) -> (T, out)


def dense_apply(params: Dense, x: jax.Array) -> jax.Array:
    """``x W^T``: ``(..., in) -> (..., out)`` in ``x``'s dtype (``W`` is cast to it)."""
    tokens = x.reshape(-1, x.shape[-1])
    y = lax.dot_general(tokens, sharding.gathered(params.w).astype(x.dtype), _CONTRACT_IN)
    return y.reshape(x.shape[:-1] + (params.w.shape[0],))


@dataclasses.dataclass(frozen=True)
class _DenseImpl:
    trained: bool

    def init(self, w: jax.Array, rank: int, *, alpha: float, key: jax.Array, dtype: Any) -> Dense:
        del rank, alpha, key
        return Dense(w=jnp.asarray(w, dtype))

    def apply(self, params: Dense, x: jax.Array) -> jax.Array:
        return dense_apply(params, x)

    def trainable(self, params: Dense) -> Dense:
        return Dense(w=self.trained)


A_SCALES = ("lora", "natural")
DEFAULT_A_SCALE = "lora"
# FALQON trains only b on a frozen A; LoRA also moves A, which in a short fine-tune grows its
# update faster. Rows of A at 3x LoRA's norm (equivalently 3x b's step under Adam) recovered
# the most of LoRA's improvement on SmolLM2-135M (gains 1, 2, 3, 4: see BENCHMARKS.md).
DEFAULT_A_GAIN = 3.0


@dataclasses.dataclass(frozen=True)
class _FalqonImpl:
    """FALQON melded layers.

    ``b_in_forward``: a live ``b`` (rules ``visible*``) or the paper's invisible one (proxy
    rules). ``a_init``: ``"svd"`` (the quantization error's singular vectors) or
    ``"random"`` (the reference code's ablation; needs the layer's key). ``a_scale``:
    ``"lora"`` rescales ``A``'s rows to PEFT LoRA's norm times ``alpha / rank``
    (:func:`falqon_jax.melded.lora_row_norm`), ``"natural"`` keeps the paper's
    ``sqrt(S_r) V_r^T`` (or the random draw) as it is.
    """

    b_in_forward: bool = True
    a_init: str = "svd"
    a_scale: str = DEFAULT_A_SCALE
    a_gain: float = DEFAULT_A_GAIN  # multiplies the "lora" row norm

    def init(
        self, w: jax.Array, rank: int, *, alpha: float, key: jax.Array, dtype: Any
    ) -> melded.MeldedLinear:
        del dtype  # the backbone is FP8 and b float32 whatever the compute dtype
        norm = None
        if self.a_scale == "lora":
            norm = self.a_gain * melded.lora_row_norm(w.shape[1], rank, alpha)
        # "grad": A comes from training gradients (falqon_jax.train.grad_init.realign, after
        # loading); until then a cheap random placeholder of the same structure.
        a_init = "random" if self.a_init == "grad" else self.a_init
        return melded.init(w, rank, key=key, init=a_init, a_row_norm=norm,
                           b_in_forward=self.b_in_forward)

    def apply(self, params: melded.MeldedLinear, x: jax.Array) -> jax.Array:
        return melded.apply(params, x)

    def apply_shared(self, layers: Sequence[melded.MeldedLinear],
                     x: jax.Array) -> tuple[jax.Array, ...]:
        return melded.apply_shared(layers, x)

    def trainable(self, params: melded.MeldedLinear) -> melded.MeldedLinear:
        return dataclasses.replace(params, w8=False, scale=False, b=True)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) ``method`` in the registry; returns it."""
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (no error if absent)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Method:
    """The registered method called ``name``; ``ValueError`` listing the names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown linear method {name!r}; available: {', '.join(available())}"
        ) from None


def available() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


FULL = register(Method("full", _DenseImpl(trained=True)))
FROZEN = register(Method("frozen", _DenseImpl(trained=False)))
FALQON = register(Method("falqon", _FalqonImpl(), fp8=True))


def falqon_method(
    *, b_in_forward: bool = True, a_init: str = "svd", a_scale: str = DEFAULT_A_SCALE,
    a_gain: float = DEFAULT_A_GAIN,
) -> str:
    """The registry name of FALQON layers with these settings, registered on first use.

    The defaults are ``"falqon"``; other settings get a name like
    ``"falqon[proxy,svd,natural]"`` (what an update rule and an ablation of ``A`` need).
    """
    if a_init not in ("svd", "random", "grad"):
        raise ValueError(f'a_init must be "svd", "random" or "grad", got {a_init!r}')
    if a_scale not in A_SCALES:
        raise ValueError(f"a_scale must be one of {', '.join(A_SCALES)}, got {a_scale!r}")
    if not a_gain > 0:
        raise ValueError(f"a_gain must be positive, got {a_gain!r}")
    impl = _FalqonImpl(b_in_forward=bool(b_in_forward), a_init=a_init, a_scale=a_scale,
                       a_gain=float(a_gain))
    if impl == FALQON.source:
        return FALQON.name
    gain = f"x{float(a_gain):g}" if a_scale == "lora" else ""
    name = f"falqon[{'live' if b_in_forward else 'proxy'},{a_init},{a_scale}{gain}]"
    if name not in _REGISTRY:
        register(Method(name, impl, fp8=True))
    return name


register(Method("lora", "falqon_jax.baselines.lora"))
register(Method("fp8_lora", "falqon_jax.baselines.fp8_lora", fp8=True))
register(Method("qlora", "falqon_jax.baselines.qlora"))


def linear_method(config: Any) -> str:
    """The registry name a training config's ``method`` means (a
    :class:`~falqon_jax.train.config.TrainConfig`: FALQON's ``rule``, ``init_a`` and
    ``a_scale`` pick the melded layers' variant)."""
    if not get(config.method).melded:
        return config.method
    return falqon_method(b_in_forward=rules.get(config.rule).live_b, a_init=config.init_a,
                         a_scale=config.a_scale, a_gain=config.a_gain)


def training_method(config: Any) -> Method:
    """The :class:`Method` a training config's ``method`` (with FALQON's ``rule``,
    ``init_a`` and ``a_scale``) means: what the trainer, checkpoints and plans ask."""
    return get(linear_method(config))
