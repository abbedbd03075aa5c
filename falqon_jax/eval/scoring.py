"""The model's side of an evaluation, in token ids: log-likelihoods of continuations and
greedy (or sampled) continuations of prompts, with the project's own forward
(:class:`~falqon_jax.model.llama.Llama`, ``module.apply``) and generation
(:func:`~falqon_jax.model.generation.generate`). Nothing here knows lm-evaluation-harness;
:mod:`falqon_jax.eval.lm` turns its requests into these calls.

Requests are scored in batches of a fixed number of rows, sorted by length (longest first,
as the harness's own ``hf`` backend does, so a batch that does not fit in memory fails at
once) and right-padded to a few bucket lengths (powers of two from 32 up to the model's
context length), so only a few programs are compiled. Requests whose model inputs are the
same (the choices of a multiple-choice question that differ only in their last token, e.g.
MMLU's " A"/" B"/" C"/" D") share one row. Per row the device returns only what scoring
needs -- the log-probability of each next input token, the greedy token at each position
and the log-softmax at the last position -- never the full ``(rows, length, vocab)`` logits.

With a ``mesh`` the weights are sharded as a training run's state
(:func:`falqon_jax.sharding.tree_shardings`, gathered at use) and the rows split over the
mesh's batch axes (the row count is rounded up to a multiple of their size).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from falqon_jax import sharding
from falqon_jax.model.generation import generate
from falqon_jax.model.llama import Llama

SHORTEST_BUCKET = 32  # tokens; the bucket lengths are powers of two from here


class RequestError(ValueError):
    """A request the model cannot score as asked (e.g. a continuation longer than its
    context); the message says why, in one line."""


def buckets(max_length: int) -> tuple[int, ...]:
    """Padded lengths: powers of two from :data:`SHORTEST_BUCKET`, the last one
    ``max_length`` itself (every input fits in one)."""
    out, n = [], SHORTEST_BUCKET
    while n < max_length:
        out.append(n)
        n *= 2
    return (*out, max_length)


def bucket_of(length: int, lengths: Sequence[int]) -> int:
    """The shortest of ``lengths`` (ascending) that holds ``length`` tokens."""
    for n in lengths:
        if n >= length:
            return n
    raise ValueError(f"{length} tokens exceed the longest bucket ({lengths[-1]})")


@partial(jax.jit, static_argnames=("module", "mesh"))
def score_rows(module: Llama, params: Any, tokens: jax.Array, lengths: jax.Array, *,
               mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One forward over right-padded ``tokens`` int32 ``(rows, T)`` whose rows hold
    ``lengths`` int32 ``(rows,)`` real tokens each.

    Returns ``(next_logp, greedy, last_logp)``: float32 ``(rows, T)``, the log-probability
    of the next input token at each position (position ``t`` scores ``tokens[:, t + 1]``;
    meaningless from ``length - 1`` on); int32 ``(rows, T)``, the most likely token at each
    position; float32 ``(rows, vocab)``, the log-softmax at each row's last real position
    (what the row predicts after its last token).
    """
    rows, width = tokens.shape
    mask = (jnp.arange(width)[None, :] < lengths[:, None]).astype(jnp.int32)
    with sharding.gathering_weights(mesh):
        logits = module.apply({"params": params}, tokens, mask).astype(jnp.float32)
    norm = jax.nn.logsumexp(logits, axis=-1)  # (rows, T)
    following = jnp.concatenate([tokens[:, 1:], jnp.zeros((rows, 1), tokens.dtype)], axis=1)
    next_logp = jnp.take_along_axis(logits, following[..., None], axis=-1)[..., 0] - norm
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    last = jnp.maximum(lengths - 1, 0)
    last_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    last_norm = jnp.take_along_axis(norm, last[:, None], axis=1)
    return next_logp, greedy, last_logits - last_norm


class Scorer:
    """Scores requests on a model: ``module`` (a :class:`~falqon_jax.model.llama.Llama`)
    with ``params``, as trained (an FP8 backbone with a live ``b`` included).

    ``batch_size``: rows per forward (rounded up to a multiple of the mesh's batch ways);
    ``max_length``: the longest model input (default: the model's
    ``max_position_embeddings``); longer inputs lose tokens on the left, as in the harness's
    ``hf`` backend; ``pad_id``: the id written into padding (masked out);
    ``progress``: show tqdm bars on stderr (on the first process only).
    """

    def __init__(self, module: Llama, params: Any, *, batch_size: int = 16,
                 max_length: int | None = None, mesh: Mesh | None = None, pad_id: int = 0,
                 progress: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.module, self.mesh, self.pad_id = module, mesh, pad_id
        self.max_length = int(max_length or module.config.max_position_embeddings)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        ways = 1 if mesh is None else sharding.batch_ways(mesh)
        self.rows = -(-batch_size // ways) * ways
        self.buckets = buckets(self.max_length)
        self.progress = progress and jax.process_index() == 0
        if mesh is not None:
            params = jax.device_put(params, sharding.tree_shardings(mesh, params))
        self.params = params

    # ----------------------------------------------------------------------------------
    # Log-likelihoods.

    def loglikelihoods(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                       desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` for each ``(context, continuation)``
        pair of token ids: the sum of the continuation tokens' log-probabilities, and
        whether greedy decoding from the context would produce exactly the continuation.

        The model's input is ``(context + continuation)[-(max_length + 1):][:-1]``, as in
        the harness's ``hf`` backend. Raises :class:`RequestError` for an empty continuation,
        one longer than ``max_length`` tokens, or no context at all.
        """
        width = self.max_length
        rows: dict[tuple[int, ...], int] = {}
        plans = []  # per request: (row, input length, continuation)
        for context, continuation in pairs:
            continuation = [int(t) for t in continuation]
            if not continuation or len(continuation) > width:
                raise RequestError(f"a continuation of {len(continuation)} tokens cannot be "
                                   f"scored with a context of {width} tokens (--max-length)")
            whole = ([int(t) for t in context] + continuation)[-(width + 1):]
            if len(whole) < 2:
                raise RequestError("a request needs at least one context token (e.g. BOS)")
            row = rows.setdefault(tuple(whole[:-1]), len(rows))
            plans.append((row, len(whole) - 1, continuation))
        inputs = list(rows)
        by_row: list[list[int]] = [[] for _ in inputs]
        for i, (row, _, _) in enumerate(plans):
            by_row[row].append(i)
        order = sorted(range(len(inputs)), key=lambda r: (-len(inputs[r]), inputs[r]))
        results: list[tuple[float, bool] | None] = [None] * len(plans)
        bar = self._bar(len(plans), desc)
        for start in range(0, len(order), self.rows):
            chunk = order[start:start + self.rows]
            next_logp, greedy, last_logp = self._forward([inputs[r] for r in chunk])
            for k, row in enumerate(chunk):
                for i in by_row[row]:
                    _, n, cont = plans[i]
                    c = len(cont)
                    logp = float(np.sum(next_logp[k, n - c:n - 1], dtype=np.float64)
                                 + np.float64(last_logp[k, cont[-1]]))
                    results[i] = (logp, bool(np.array_equal(greedy[k, n - c:n], cont)))
                bar.update(len(by_row[row]))
        bar.close()
        return results  # type: ignore[return-value]

    def _forward(self, inputs: list[tuple[int, ...]]) -> tuple[np.ndarray, ...]:
        """:func:`score_rows` over ``inputs`` (at most ``self.rows``), padded to a full
        batch of one bucket's length; the host copies of its outputs."""
        width = bucket_of(max(len(x) for x in inputs), self.buckets)
        tokens = np.full((self.rows, width), self.pad_id, np.int32)
        lengths = np.ones((self.rows,), np.int32)  # filler rows: one pad token
        for k, x in enumerate(inputs):
            tokens[k, :len(x)] = x
            lengths[k] = len(x)
        outputs = score_rows(self.module, self.params, self._place(tokens),
                             self._place(lengths), mesh=self.mesh)
        return tuple(_host(x) for x in outputs)

    def _place(self, rows: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(rows)
        return sharding.global_batch(sharding.batch_sharding(self.mesh), rows)

    # ----------------------------------------------------------------------------------
    # Generation.

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 eos_ids: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, desc: str = "generate") -> list[list[int]]:
        """Continue each prompt (token ids, at least one each) by up to ``max_new_tokens``
        tokens with :func:`~falqon_jax.model.generation.generate`: greedy for
        ``temperature == 0``; each continuation ends after its first id of ``eos_ids``
        (kept). Prompts are batched longest first and left-padded to bucket lengths."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[list[int]] = [[] for _ in prompts]
        bar = self._bar(len(prompts), desc)
        for start in range(0, len(order), self.rows):
            chunk = order[start:start + self.rows]
            batch = [list(prompts[i]) for i in chunk]
            batch += [batch[-1]] * (self.rows - len(batch))  # filler rows end with the last
            longest = max(len(p) for p in batch)
            width = bucket_of(longest, self.buckets) if longest <= self.max_length else longest
            outs = generate(self.module, self.params, batch, max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed,
                            eos_id=list(eos_ids) or None, pad_id=self.pad_id, mesh=self.mesh,
                            width=width)
            for k, i in enumerate(chunk):
                results[i] = outs[k]
            bar.update(len(chunk))
        bar.close()
        return results

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="req", file=sys.stderr,
                    disable=not self.progress or total == 0, dynamic_ncols=True,
                    mininterval=0.5 if sys.stderr.isatty() else 10.0)


def _host(x: jax.Array) -> np.ndarray:
    """``x`` as a NumPy array on this host (gathered from every process in a multi-host
    job)."""
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
