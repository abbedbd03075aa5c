"""Text generation with a KV cache: greedy, or temperature + top-p sampling, fully jitted.

Prompts of different lengths are left-padded; the model's RoPE positions count real tokens
only, so padding does not change the continuation. The prompt is prefilled in one call, then
one token per step is decoded inside a ``lax.while_loop`` that stops early once every row
has produced an end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from falqon_jax.llama import KVCache, Llama


def sample_logits(
    logits: jax.Array, key: jax.Array, temperature: float, top_p: float
) -> jax.Array:
    """Next tokens, int32 ``(batch,)``, from float32 logits ``(batch, vocab)``.

    ``temperature == 0`` is greedy (argmax; ``key`` and ``top_p`` are unused). Otherwise
    sample from ``softmax(logits / temperature)`` restricted to the nucleus: the smallest
    set of most likely tokens whose probability reaches ``top_p`` (``top_p = 1``: all).
    Tokens tied with the least likely member of the nucleus are kept too.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass before it is below top_p (the first always survives).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_index = jnp.sum(mass_before < top_p, axis=-1) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index[:, None], axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("module", "max_new_tokens", "temperature", "top_p", "eos_ids"))
def _generate(
    module: Llama,
    params: Any,
    tokens: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: tuple[int, ...],
) -> jax.Array:
    """New tokens int32 ``(batch, max_new_tokens)`` for left-padded ``tokens`` ``(batch, len)``.

    After a row's first EOS the rest of the row is ``eos_ids[0]`` (or, once the loop stopped
    early because every row is done, zeros).
    """
    batch, prompt_len = tokens.shape
    cache = KVCache.empty(module.config, batch, prompt_len + max_new_tokens, module.dtype)
    logits, cache = module.apply({"params": params}, tokens, mask, cache)
    ones = jnp.ones((batch, 1), jnp.int32)
    eos = jnp.asarray(eos_ids or (0,), jnp.int32)

    def cond(carry: tuple[Any, ...]) -> jax.Array:
        i, done = carry[0], carry[4]
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        i, cache, logits, out, done, key = carry
        key, sub = jax.random.split(key)
        nxt = sample_logits(logits, sub, temperature, top_p)
        if eos_ids:
            nxt = jnp.where(done, eos[0], nxt)
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
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    Args:
      module, params: the model (e.g. ``model.module`` and ``model.params`` of a
        :class:`~falqon_jax.llama.LlamaModel`).
      prompts: one list of int token ids per row (each non-empty; include BOS yourself).
      max_new_tokens: tokens to generate per row (at most).
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_p: nucleus sampling mass in ``(0, 1]`` (1 keeps every token).
      seed: PRNG seed; the same seed, prompts and settings give the same tokens.
      eos_id: end-of-sequence id, or several; ``None`` never stops early.
      pad_id: id written into left padding (masked out, so any valid id works).

    Returns:
      The new tokens per prompt, cut after the first EOS (which is included).

    Raises:
      ValueError: an empty prompt, ``max_new_tokens < 1``, a negative temperature or
        ``top_p`` outside ``(0, 1]``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    eos_ids = _eos_tuple(eos_id)
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    out = _generate(
        module,
        params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jax.random.key(seed),
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        eos_ids=eos_ids,
    )
    results = []
    for row in np.asarray(out).tolist():
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        results.append(row[: ends[0] + 1] if ends else row)
    return results
