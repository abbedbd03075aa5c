"""Text generation with a KV cache: greedy, or temperature + top-p sampling, fully jitted.

Prompts of different lengths are left-padded; the model's RoPE positions count real tokens
only, so padding does not change the continuation. The prompt is prefilled in one call, then
one token per step is decoded inside a ``lax.while_loop`` that stops early once every row
has produced an end-of-sequence token. Sampling settings and EOS ids are traced values, so
one compiled program serves every setting for a given batch, prompt width and length.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from falqon_jax import sharding
from falqon_jax.model.llama import KVCache, Llama


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    temperature: float | jax.Array,
    top_p: float | jax.Array,
) -> jax.Array:
    """Next tokens, int32 ``(batch,)``, from float32 logits ``(batch, vocab)``.

    ``temperature == 0`` is greedy (argmax; ``key`` and ``top_p`` are unused). Otherwise
    sample from ``softmax(logits / temperature)`` restricted to the nucleus: the smallest
    set of most likely tokens whose probability reaches ``top_p`` (``top_p = 1``: all).
    Tokens tied with the least likely member of the nucleus are kept too.

    ``temperature`` and ``top_p`` may be Python numbers (only the branch needed is traced)
    or float32 scalars (traced: one compiled program serves every setting).
    """
    logits = logits.astype(jnp.float32)
    static = isinstance(temperature, int | float) and isinstance(top_p, int | float)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if static and temperature == 0:
        return greedy
    t = jnp.asarray(temperature, jnp.float32)
    scaled = logits / jnp.where(t > 0, t, 1.0)
    if not static or top_p < 1.0:
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass before it is below top_p (the first always survives).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_index = jnp.sum(mass_before < top_p, axis=-1) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index[:, None], axis=-1)
        nucleus = jnp.where(scaled < cutoff, -jnp.inf, scaled)
        scaled = jnp.where(jnp.asarray(top_p) < 1.0, nucleus, scaled)
    sampled = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return sampled if static else jnp.where(t > 0, sampled, greedy)


@partial(jax.jit, static_argnames=("module", "max_new_tokens", "mesh"))
def _generate(
    module: Llama,
    params: Any,
    tokens: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    eos: jax.Array,
    *,
    max_new_tokens: int,
    mesh: Mesh | None = None,
) -> jax.Array:
    """New tokens int32 ``(batch, max_new_tokens)`` for left-padded ``tokens`` ``(batch, len)``.

    ``temperature``, ``top_p``: float32 scalars; ``eos``: int32 ``(n,)`` end-of-sequence
    ids, ``-1`` for none. After a row's first EOS the rest of the row is that row's EOS
    (zeros once the loop has stopped early because every row is done). With ``mesh``,
    weights are gathered at use (FSDP, :func:`falqon_jax.sharding.gathered`).
    """
    with sharding.gathering_weights(mesh):
        return _decode_loop(module, params, tokens, mask, key, temperature, top_p, eos,
                            max_new_tokens)


def _decode_loop(module, params, tokens, mask, key, temperature, top_p, eos, max_new_tokens):
    batch, prompt_len = tokens.shape
    cache = KVCache.empty(module.config, batch, prompt_len + max_new_tokens, module.dtype)
    logits, cache = module.apply({"params": params}, tokens, mask, cache)
    ones = jnp.ones((batch, 1), jnp.int32)

    def cond(carry: tuple[Any, ...]) -> jax.Array:
        i, done = carry[0], carry[4]
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        i, cache, logits, out, done, key = carry
        key, sub = jax.random.split(key)
        nxt = sample_logits(logits, sub, temperature, top_p)
        prev = lax.dynamic_index_in_dim(out, jnp.maximum(i - 1, 0), axis=1, keepdims=False)
        nxt = jnp.where(done, prev, nxt)
        done = done | jnp.isin(nxt, eos)
        out = lax.dynamic_update_index_in_dim(out, nxt, i, axis=1)
        step_logits, cache = module.apply({"params": params}, nxt[:, None], ones, cache)
        return i + 1, cache, step_logits[:, -1], out, done, key

    out = jnp.zeros((batch, max_new_tokens), jnp.int32)
    done = jnp.zeros((batch,), bool)
    carry = (jnp.zeros((), jnp.int32), cache, logits[:, -1], out, done, key)
    return lax.while_loop(cond, body, carry)[3]


def _eos_tuple(eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_id is None:
        return ()
    if isinstance(eos_id, int | np.integer):
        return (int(eos_id),)
    return tuple(int(e) for e in eos_id)


def _pad_eos(eos_ids: tuple[int, ...]) -> list[int]:
    """EOS ids padded with ``-1`` to a multiple of 4 (at least 4), so the compiled program
    does not depend on how many there are."""
    size = max(4, -(-len(eos_ids) // 4) * 4)
    return list(eos_ids) + [-1] * (size - len(eos_ids))


def generate(
    module: Llama,
    params: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    width: int | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    Args:
      module, params: the model (e.g. ``model.module`` and ``model.params`` of a
        :class:`~falqon_jax.model.llama.LlamaModel`).
      prompts: one list of int token ids per row (each non-empty; include BOS yourself).
      max_new_tokens: tokens to generate per row (at most).
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_p: nucleus sampling mass in ``(0, 1]`` (1 keeps every token).
      seed: PRNG seed; the same seed, prompts and settings give the same tokens.
      eos_id: end-of-sequence id, or several; ``None`` never stops early.
      pad_id: id written into left padding (masked out, so any valid id works).
      mesh: run sharded over this mesh (``params`` placed by
        :func:`falqon_jax.sharding.tree_shardings`, e.g. a training run's state): prompts
        split over its batch axes when their count divides, else replicated.
      width: left-pad the prompts to at least this many tokens, so that batches of prompts
        of different lengths share one compiled program (padding changes no token).

    Returns:
      The new tokens per prompt, cut after the first EOS (which is included).

    Raises:
      ValueError: an empty prompt, ``max_new_tokens < 1``, a negative temperature or
        ``top_p`` outside ``(0, 1]``.
    """
    _check_settings(prompts, max_new_tokens, temperature, top_p)
    eos_ids = _eos_tuple(eos_id)
    tokens, mask = _left_padded(prompts, pad_id, mesh, width)
    out = _generate(
        module,
        params,
        tokens,
        mask,
        jax.random.key(seed),
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.asarray(_pad_eos(eos_ids), jnp.int32),
        max_new_tokens=int(max_new_tokens),
        mesh=mesh,
    )
    return _cut_after_eos(np.asarray(out), eos_ids)


def _check_settings(prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    temperature: float, top_p: float) -> None:
    """``ValueError`` for an empty prompt (or none), ``max_new_tokens < 1``, a negative
    temperature or ``top_p`` outside ``(0, 1]``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int, mesh: Mesh | None,
                 width: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The prompts left-padded with ``pad_id`` to the longest (or to ``width``, if longer):
    int32 ``tokens`` and ``mask`` (1 on real tokens), both ``(batch, width)``; with ``mesh``,
    split over its batch axes when the row count divides, else replicated."""
    width = max(max(len(p) for p in prompts), width or 0)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    if mesh is None:
        return jnp.asarray(tokens), jnp.asarray(mask)
    rows = sharding.batch_sharding(mesh) if len(prompts) % sharding.batch_ways(mesh) == 0 \
        else sharding.replicated(mesh)
    return jax.device_put((tokens, mask), rows)


def _cut_after_eos(out: np.ndarray, eos_ids: tuple[int, ...]) -> list[list[int]]:
    """Each row of int ``out (batch, max_new_tokens)`` as a list, cut after its first EOS
    (kept)."""
    results = []
    for row in out.tolist():
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        results.append(row[: ends[0] + 1] if ends else row)
    return results
