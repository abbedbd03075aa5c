"""Small helpers the tests share (no fixtures: those live in ``conftest.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np


def rel_err(a: Any, ref: Any) -> float:
    """max |a - ref| / max |ref|, in float64."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def decode_step_by_step(model: Any, tokens: np.ndarray, mask: np.ndarray, prefill: int,
                        max_len: int) -> tuple[np.ndarray, Any]:
    """Prefill ``model``'s KV cache with the first ``prefill`` tokens (``mask`` for them),
    then decode the rest one token at a time: ``(logits [B, L, V], cache)``."""
    cache = model.init_cache(batch=tokens.shape[0], max_len=max_len)
    logits, cache = model.decode(tokens[:, :prefill], cache, mask[:, :prefill])
    steps = [np.asarray(logits)]
    for i in range(prefill, tokens.shape[1]):
        logits, cache = model.decode(tokens[:, i : i + 1], cache)
        steps.append(np.asarray(logits))
    return np.concatenate(steps, axis=1), cache
