"""Causal self-attention: a masked XLA path for any padding and a KV cache, and a fused one.

Shapes: queries ``q`` ``(batch, seq, heads, head_dim)``; keys and values ``k``, ``v``
``(batch, keys, kv_heads, head_dim)`` with ``heads`` a multiple of ``kv_heads`` (grouped
queries). Outputs are ``(batch, seq, heads, head_dim)`` in ``v``'s dtype. Scores are scaled
by ``head_dim ** -0.5`` and the softmax runs in float32 on both paths.

* :func:`masked` -- einsums and an additive float32 mask ``(batch, seq, keys)``: any
  padding (left-padded prompts), a KV cache, any dtype and platform. It materializes the
  ``seq x keys`` scores and probabilities.
* :func:`fused` -- ``jax.nn.dot_product_attention``, causal, with each row's padding given
  by its length: cuDNN's flash attention on NVIDIA GPUs (no ``seq x seq`` tensor, forward
  or backward). Padding must be on the right, as in the batches training builds.

:func:`choose` turns ``--attention auto|cudnn|xla`` into the one a model runs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

CHOICES = ("auto", "cudnn", "xla")
FUSED_DTYPES = ("bfloat16", "float16")  # what cuDNN's flash attention computes in


def choose(requested: str, platform: str, dtype: Any) -> str:
    """``"cudnn"`` or ``"xla"`` for ``requested`` (one of :data:`CHOICES`) on devices of
    ``platform`` (``jax.Device.platform``: ``"gpu"``/``"cuda"`` for NVIDIA GPUs, ``"cpu"``,
    ...) computing in ``dtype``.

    ``auto`` is cuDNN on an NVIDIA GPU in bfloat16 or float16, XLA otherwise. ``ValueError``
    (one line) when ``cudnn`` is asked for where it cannot run."""
    if requested not in CHOICES:
        raise ValueError(f"attention must be one of {', '.join(CHOICES)}, got {requested!r}")
    on_nvidia = platform in ("gpu", "cuda")
    dtype_name = jnp.dtype(dtype).name
    if requested == "xla":
        return "xla"
    if requested == "auto":
        return "cudnn" if on_nvidia and dtype_name in FUSED_DTYPES else "xla"
    if not on_nvidia:
        raise ValueError(f"--attention cudnn needs an NVIDIA GPU; this run's devices are "
                         f"{platform}: use --attention auto or xla")
    if dtype_name not in FUSED_DTYPES:
        raise ValueError(f"--attention cudnn computes in bfloat16 or float16, not {dtype_name}:"
                         " use --dtype bfloat16, or --attention xla")
    return "cudnn"


def masked(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Attention with an additive float32 ``bias`` ``(batch, seq, keys)`` (0 where a query
    may see a key, very negative where not); scores and softmax in float32."""
    b, s, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, s, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bsngd,btnd->bngst", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5) + bias[:, None, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bngst,btnd->bsngd", probs, v).reshape(b, s, heads, head_dim)


def fused(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
          implementation: str = "cudnn") -> jax.Array:
    """Causal attention where row ``i``'s keys are its first ``lengths[i]`` (int32
    ``(batch,)``) positions: the padding on the right is never attended to, as in
    :func:`masked` with the mask of a right-padded batch. ``implementation`` is
    ``jax.nn.dot_product_attention``'s (``"xla"`` computes the same on any platform)."""
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, key_value_seq_lengths=lengths.astype(jnp.int32),
        implementation=implementation)
