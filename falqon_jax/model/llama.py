"""The LLaMA decoder in Flax (linen), with pluggable linear-layer methods and a KV cache.

Parameter tree (``L`` = number of layers; linear entries are method pytrees, e.g.
:class:`falqon_jax.model.methods.Dense` or :class:`falqon_jax.melded.MeldedLinear`, whose leaves
carry a leading ``L`` axis inside ``layers``)::

    embed_tokens                      (vocab, hidden)       compute dtype
    layers/input_layernorm/weight     (L, hidden)           float32
    layers/self_attn/{q,k,v,o}_proj   method pytree         weight layout (out, in)
    layers/post_attention_layernorm/weight
    layers/mlp/{gate,up,down}_proj    method pytree
    norm/weight                       (hidden,)             float32
    lm_head                           method pytree         absent when tied to embed_tokens

The layers are one ``nn.scan``, so compile time does not grow with depth. Norms, RoPE and
the softmax run in float32; everything else in the compute dtype (bfloat16 or float32).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from falqon_jax import melded, sharding
from falqon_jax.model import attention, methods
from falqon_jax.model.config import LlamaConfig

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # default linear targets
ALL_TARGETS = TARGETS + ("lm_head",)
INIT_STD = 0.02  # standard deviation of randomly initialised weights (as in Hugging Face)
_NEG_INF = float(np.finfo(np.float32).min)  # finite, so fully masked rows give no NaN
# Gradient checkpointing saves FALQON's Q(A x) (tokens x rank bytes per layer): a layer
# whose output only the residual stream reads (o_proj, down_proj) is then not recomputed.
REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(melded.SAVED_RESIDUAL)


def linear_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """``(out, in)`` weight shape of every linear target."""
    c = config
    return {
        "q": (c.num_heads * c.head_dim, c.hidden_size),
        "k": (c.num_kv_heads * c.head_dim, c.hidden_size),
        "v": (c.num_kv_heads * c.head_dim, c.hidden_size),
        "o": (c.hidden_size, c.num_heads * c.head_dim),
        "gate": (c.intermediate_size, c.hidden_size),
        "up": (c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
        "lm_head": (c.vocab_size, c.hidden_size),
    }


@dataclasses.dataclass(frozen=True)
class LinearPlan:
    """The method (registry name) of each linear target, plus the adapter rank and alpha.

    ``train_base``: whether embeddings and norms are trainable (full fine-tuning only).
    """

    q: str = "full"
    k: str = "full"
    v: str = "full"
    o: str = "full"
    gate: str = "full"
    up: str = "full"
    down: str = "full"
    lm_head: str = "full"
    rank: int = 64
    alpha: float = 16.0
    train_base: bool = True

    def method(self, target: str) -> methods.Method:
        """The :class:`~falqon_jax.model.methods.Method` used by ``target``."""
        return methods.get(getattr(self, target))


def plan_linears(
    config: LlamaConfig,
    method: str = "full",
    *,
    targets: Iterable[str] | None = None,
    rank: int = 64,
    alpha: float = 16.0,
) -> LinearPlan:
    """Choose each linear layer's method.

    ``targets`` (default: the seven decoder projections; add ``"lm_head"`` to convert the
    output layer too) get ``method``; the others stay dense and frozen. With
    ``method="full"`` every layer is dense and trained. A targeted layer whose shape the
    method rejects (e.g. dims not multiples of 16 for FP8 methods) stays dense and frozen,
    with a ``UserWarning`` saying why.
    """
    chosen = methods.get(method)
    targets = TARGETS if targets is None else tuple(targets)
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown:
        raise ValueError(f"unknown targets {unknown}; choose from {ALL_TARGETS}")
    if method == "full":
        return LinearPlan(rank=rank, alpha=alpha, train_base=True)
    names, skipped, reasons = {}, [], []
    for target, (out, in_features) in linear_shapes(config).items():
        names[target] = "frozen"
        if target not in targets:
            continue
        problem = chosen.check(out, in_features, rank)
        if problem:
            skipped.append(f"{target} ({out}x{in_features})")
            # the shape is named beside the layer: the reason once where layers share it
            reason = _SHAPE_PREFIX.sub("", problem).removesuffix(
                "; leave this layer unconverted")
            if reason and reason not in reasons:
                reasons.append(reason)
            continue
        names[target] = method
    if skipped:
        warnings.warn(
            f"{method} leaves {len(skipped)} layer kind(s) unconverted (dense, frozen): "
            f"{', '.join(skipped)}: {'; '.join(reasons)}",
            UserWarning,
            stacklevel=2,
        )
    return LinearPlan(**names, rank=rank, alpha=alpha, train_base=False)


_SHAPE_PREFIX = re.compile(r"^layer shape \(out=\d+, in=\d+\) (is )?")


# --------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half convention, as in Hugging Face).


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies ``(head_dim // 2,)`` float32, after any ``rope_scaling``."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    inv_freq = (1.0 / (config.rope_theta**exponents)).astype(np.float64)
    scaling = config.rope_scaling
    if scaling is None:
        pass
    elif scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions: jax.Array, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """RoPE tables for int ``positions`` ``(batch, seq)``.

    Returns ``(cos, sin)``, each float32 ``(batch, seq, head_dim)``.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``(batch, seq, heads, head_dim)`` by ``cos``/``sin`` ``(batch, seq, head_dim)``.

    Computed in float32 (rotate-half convention), returned in ``x``'s dtype.
    """
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


# --------------------------------------------------------------------------------------
# Layers.


def _linear(
    module: nn.Module, name: str, plan: LinearPlan, target: str, x: jax.Array, out: int, dtype: Any
) -> jax.Array:
    """A linear layer through its registry method; params stored as ``module.<name>``."""
    return _linears(module, ((name, target, out),), plan, x, dtype)[0]


def _linears(
    module: nn.Module, layers: tuple[tuple[str, str, int], ...], plan: LinearPlan,
    x: jax.Array, dtype: Any,
) -> tuple[jax.Array, ...]:
    """Linear layers ``(name, target, out)`` that read the same ``x`` (q/k/v; gate/up), each
    through its registry method with params ``module.<name>``; layers of one method run
    together (:meth:`~falqon_jax.model.methods.Method.apply_shared`)."""
    in_features = x.shape[-1]
    params, used = [], []
    for name, target, out in layers:
        method = plan.method(target)

        def init(key: jax.Array, method=method, out=out) -> Any:
            k_w, k_m = jax.random.split(key)
            w = INIT_STD * jax.random.normal(k_w, (out, in_features), jnp.float32)
            return method.init(w, plan.rank, alpha=plan.alpha, key=k_m, dtype=dtype)

        params.append(module.param(name, init))
        used.append(method)
    if all(method == used[0] for method in used):
        return used[0].apply_shared(params, x)
    return tuple(method.apply(p, x) for method, p in zip(used, params, strict=True))


class RMSNorm(nn.Module):
    """RMS normalisation in float32 with a float32 ``weight`` ``(hidden,)``; output in ``dtype``."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (sharding.gathered(weight) * x32).astype(self.dtype)


KV = tuple[jax.Array, jax.Array]  # one layer's cached (k, v): (b, max_len, kv_heads, head_dim)


class Positions(NamedTuple):
    """Where a call's tokens sit, the same for every layer (``nn.scan`` broadcasts it).

    ``cos``, ``sin``: float32 ``(b, s, head_dim)``, the RoPE rotation of each token;
    ``keys``: what each query may attend to, a float32 bias ``(b, s, keys)`` (0 or very
    negative) or int32 row lengths ``(b,)`` (causal, right padding; never with a cache);
    ``index``: int32 scalar, the cache slot of the first token (``None`` without a cache).
    """

    cos: jax.Array
    sin: jax.Array
    keys: jax.Array
    index: jax.Array | None


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache.

    What ``pos.keys`` is picks the kernel (:class:`Llama` decides which it builds): a bias
    goes to :func:`~falqon_jax.model.attention.masked` (any padding, a KV cache), row lengths
    to :func:`~falqon_jax.model.attention.fused` (causal, right padding).
    """

    config: LlamaConfig
    plan: LinearPlan
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, pos: Positions, kv: KV | None) -> tuple[jax.Array, KV | None]:
        """``x`` ``(b, s, hidden)`` -> same, at positions ``pos`` (:class:`Positions`).

        With a cache, ``kv`` is this layer's ``(k, v)`` ``(b, max_len, kv_heads, head_dim)``;
        the new keys/values are written at slot ``pos.index`` and the updated pair is returned.
        """
        c, p, dt = self.config, self.plan, self.dtype
        b, s, _ = x.shape
        q, k, v = _linears(self, (("q_proj", "q", c.num_heads * c.head_dim),
                                  ("k_proj", "k", c.num_kv_heads * c.head_dim),
                                  ("v_proj", "v", c.num_kv_heads * c.head_dim)), p, x, dt)
        q = apply_rope(q.reshape(b, s, c.num_heads, c.head_dim), pos.cos, pos.sin)
        k = apply_rope(k.reshape(b, s, c.num_kv_heads, c.head_dim), pos.cos, pos.sin)
        v = v.reshape(b, s, c.num_kv_heads, c.head_dim)
        if kv is not None:
            k = lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, pos.index, 0, 0))
            v = lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, pos.index, 0, 0))
            kv = (k, v)
        if pos.keys.ndim == 1:
            attn = attention.fused(q, k, v, pos.keys)
        else:
            attn = attention.masked(q, k, v, pos.keys)
        attn = attn.astype(dt).reshape(b, s, c.num_heads * c.head_dim)
        return _linear(self, "o_proj", p, "o", attn, c.hidden_size, dt), kv


class MLP(nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))``: ``(b, s, hidden) -> (b, s, hidden)``, ``dtype``."""

    config: LlamaConfig
    plan: LinearPlan
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, p, dt = self.config, self.plan, self.dtype
        gate, up = _linears(self, (("gate_proj", "gate", c.intermediate_size),
                                   ("up_proj", "up", c.intermediate_size)), p, x, dt)
        return _linear(self, "down_proj", p, "down", nn.silu(gate) * up, c.hidden_size, dt)


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP block, written as an ``nn.scan`` body over layers."""

    config: LlamaConfig
    plan: LinearPlan
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, pos: Positions, kv: KV | None) -> tuple[jax.Array, KV | None]:
        """``x`` ``(b, s, hidden)`` in ``dtype`` -> same; arguments as for :class:`Attention`."""
        c, dt = self.config, self.dtype
        h = RMSNorm(c.rms_norm_eps, dt, name="input_layernorm")(x)
        h, kv = Attention(c, self.plan, dt, name="self_attn")(h, pos, kv)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, dt, name="post_attention_layernorm")(x)
        return x + MLP(c, self.plan, dt, name="mlp")(h), kv


# --------------------------------------------------------------------------------------
# The model.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values of every layer for incremental decoding.

    ``k``, ``v``: ``(layers, batch, max_len, kv_heads, head_dim)`` in the compute dtype;
    ``mask``: bool ``(batch, max_len)``, which slots hold real (non-padding) tokens;
    ``index``: int32 scalar, slots filled so far; ``next_position``: int32 ``(batch,)``,
    the RoPE position of each row's next token. Writing past ``max_len`` is not checked.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array
    next_position: jax.Array

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, max_len: int, dtype: Any) -> KVCache:
        """An empty cache for ``batch`` rows of up to ``max_len`` tokens."""
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((batch,), jnp.int32),
        )


class Llama(nn.Module):
    """LLaMA causal LM: int tokens ``(batch, seq)`` -> float32 logits ``(batch, seq, vocab)``.

    ``attention_mask`` (0/1, ``(batch, seq)``) marks real tokens; padding may be on either
    side. RoPE positions count real tokens only (``cumsum(mask) - 1``), so a left-padded row
    gives the same logits as the unpadded one. With ``cache`` (a :class:`KVCache`) the call
    appends ``tokens`` to it and returns ``(logits, new_cache)``.

    ``attention``: ``"xla"`` (any padding) or ``"cudnn"`` (fused flash attention on an
    NVIDIA GPU, bfloat16/float16; without a cache the padding must be on the right, as in
    training batches; calls with a cache use ``"xla"``). See
    :func:`falqon_jax.model.attention.choose`.
    """

    config: LlamaConfig
    plan: LinearPlan = LinearPlan()
    dtype: Any = jnp.bfloat16
    remat: bool = False
    attention: str = "xla"

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        c, dt = self.config, self.dtype
        batch, seq = tokens.shape
        mask = (
            jnp.ones((batch, seq), bool) if attention_mask is None else attention_mask.astype(bool)
        )
        offsets = jnp.maximum(jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0)
        if cache is None:
            positions, key_mask, index, kv = offsets, mask, None, None
            query_slots = jnp.arange(seq)
        else:
            positions = cache.next_position[:, None] + offsets
            key_mask = lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
            index, kv = cache.index, (cache.k, cache.v)
            query_slots = cache.index + jnp.arange(seq)
        if self.attention not in ("xla", "cudnn"):
            raise ValueError(f'attention must be "xla" or "cudnn", got {self.attention!r}')
        if self.attention == "cudnn" and cache is None:
            keys = mask.sum(axis=-1, dtype=jnp.int32)  # right padding: each row's length
        else:
            key_slots = jnp.arange(key_mask.shape[1])
            allowed = key_mask[:, None, :] & (key_slots[None, None, :]
                                              <= query_slots[None, :, None])
            keys = jnp.where(allowed, 0.0, _NEG_INF).astype(jnp.float32)
        cos, sin = rope_cos_sin(positions, c)

        embed = self.param(
            "embed_tokens", nn.initializers.normal(INIT_STD), (c.vocab_size, c.hidden_size), dt
        )
        x = jnp.take(sharding.gathered(embed), tokens, axis=0).astype(dt)

        layer = DecoderLayer
        if self.remat:
            layer = nn.remat(layer, prevent_cse=False, policy=REMAT_POLICY)
        stack = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, 0),  # the positions, each layer's (k, v)
            length=c.num_layers,
        )
        x, kv = stack(c, self.plan, dt, name="layers")(x, Positions(cos, sin, keys, index), kv)
        x = RMSNorm(c.rms_norm_eps, dt, name="norm")(x)
        logits = self._lm_head(x, embed).astype(jnp.float32)
        if cache is None:
            return logits
        new_cache = KVCache(
            k=kv[0],
            v=kv[1],
            mask=key_mask,
            index=cache.index + seq,
            next_position=cache.next_position + mask.sum(axis=-1, dtype=jnp.int32),
        )
        return logits, new_cache

    def _lm_head(self, x: jax.Array, embed: jax.Array) -> jax.Array:
        plan = self.plan
        if self.config.tie_word_embeddings and plan.lm_head in ("full", "frozen"):
            return methods.dense_apply(methods.Dense(embed), x)
        method = plan.method("lm_head")

        def init(key: jax.Array) -> Any:
            if self.config.tie_word_embeddings:
                w = embed.astype(jnp.float32)
            else:
                w = INIT_STD * jax.random.normal(key, embed.shape, jnp.float32)
            return method.init(w, plan.rank, alpha=plan.alpha, key=key, dtype=self.dtype)

        return method.apply(self.param("lm_head", init), x)


def trainable_mask(params: dict[str, Any], plan: LinearPlan) -> dict[str, Any]:
    """Bool pytree shaped like ``params``: which leaves an optimizer should update."""
    mask = jax.tree.map(lambda _: plan.train_base, params)
    layers = mask["layers"]
    for group, target in [("self_attn", t) for t in ("q", "k", "v", "o")] + [
        ("mlp", t) for t in ("gate", "up", "down")
    ]:
        name = f"{target}_proj"
        layers[group][name] = plan.method(target).trainable(params["layers"][group][name])
    if "lm_head" in params:
        mask["lm_head"] = plan.method("lm_head").trainable(params["lm_head"])
    return mask


class LlamaModel:
    """A :class:`Llama` module bound to its config and params, with jitted entry points.

    Attributes: ``config`` (:class:`LlamaConfig`), ``plan`` (:class:`LinearPlan`),
    ``module`` (the Flax module, for ``module.apply({"params": params}, ...)``), ``params``.
    """

    def __init__(self, module: Llama, params: dict[str, Any]) -> None:
        self.module = module
        self.config = module.config
        self.plan = module.plan
        self.params = params
        self._forward = jax.jit(self._apply)
        self._step = jax.jit(self._apply_cached, donate_argnums=(3,))

    def _apply(self, params: Any, tokens: jax.Array, mask: jax.Array | None) -> jax.Array:
        return self.module.apply({"params": params}, tokens, mask)

    def _apply_cached(
        self, params: Any, tokens: jax.Array, mask: jax.Array | None, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        return self.module.apply({"params": params}, tokens, mask, cache)

    def logits(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Int ``tokens`` ``(batch, seq)`` -> float32 logits ``(batch, seq, vocab)``.

        ``attention_mask``: optional 0/1 ``(batch, seq)``, 1 for real tokens.
        """
        return self._forward(self.params, jnp.asarray(tokens, jnp.int32), _as_mask(attention_mask))

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` rows of up to ``max_len`` tokens."""
        return KVCache.empty(self.config, batch, max_len, self.module.dtype)

    def decode(
        self, tokens: jax.Array, cache: KVCache, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Append ``tokens`` ``(batch, seq)`` to ``cache`` (consumed): float32 logits, new cache.

        Prefill with the (padded) prompt and its mask, then feed one token per call.
        Raises ``ValueError`` when the tokens would not fit in the cache.
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        filled, room = int(cache.index), cache.mask.shape[1]
        if filled + tokens.shape[1] > room:
            raise ValueError(
                f"KV cache full: {filled} + {tokens.shape[1]} tokens exceed max_len={room}"
            )
        return self._step(self.params, tokens, _as_mask(attention_mask), cache)

    def trainable(self) -> dict[str, Any]:
        """Bool pytree shaped like ``params`` (see :func:`trainable_mask`)."""
        return trainable_mask(self.params, self.plan)


def _as_mask(mask: jax.Array | None) -> jax.Array | None:
    return None if mask is None else jnp.asarray(mask, jnp.int32)


def abstract_params(module: Llama) -> Any:
    """Shapes and dtypes (``jax.ShapeDtypeStruct`` leaves) of ``module``'s params, no compute."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), tokens)["params"]
