"""The end of a finished run: the held-out loss and perplexity, and a greedy sample
generation from a held-out prompt (on the demo, the exact-match rate over 64 prompts)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from falqon_jax.model.generation import generate
from falqon_jax.train import data
from falqon_jax.train.config import TrainConfig
from falqon_jax.train.prepare import Prepared, uses_char_tokenizer


def report_samples(prep: Prepared, model: Any, eval_loss: float | None,
                   mesh: Any = None) -> None:
    """Print the final held-out metrics and a sample generation."""
    config, tok = prep.config, prep.tokenizer
    if eval_loss is not None:
        print(f"held-out loss: {eval_loss:.4f} (perplexity {math.exp(min(eval_loss, 50)):.2f})")
    if not prep.held_out_examples or config.sample_tokens == 0:
        return
    cases = prep.held_out_examples[: 64 if config.is_demo else 1]

    prompts = [prompt_tokens(ex, tok, config)[: config.source_len] for ex in cases]
    outs = generate(model.module, model.params, prompts, config.sample_tokens,
                    eos_id=tok.eos_token_id, pad_id=0, mesh=mesh)
    texts = [tok.decode(o, skip_special_tokens=True) if not uses_char_tokenizer(config)
             else tok.decode(o) for o in outs]
    if config.is_demo:
        want = ["".join(s.text for s in ex if s.trained) for ex in cases]
        exact = np.mean([t.strip() == w for t, w in zip(texts, want, strict=True)])
        print(f"held-out exact match: {exact:.0%} of {len(cases)} prompts (greedy)")
    print(f"sample: {prompt_text(cases[0], tok)!r} -> {texts[0]!r}")


def prompt_text(example: Any, tokenizer: Any) -> str:
    """The text a sample generation starts from: a chat rendered up to its first assistant
    reply (the template's generation prompt included), else the untrained text."""
    if isinstance(example, data.Chat):
        segments = data.render_chat(example, tokenizer)
        first = next(i for i, s in enumerate(segments) if s.trained)
        return "".join(s.text for s in segments[:first])
    return "".join(s.text for s in example if not s.trained)


def prompt_tokens(example: Any, tokenizer: Any, config: TrainConfig) -> list[int]:
    """Token ids of :func:`prompt_text`, encoded as in training: a chat exactly as its
    template renders it, other formats with a BOS in front where the tokenizer adds one
    (:func:`falqon_jax.train.data.leading_bos`)."""
    text = prompt_text(example, tokenizer)
    ids = tokenizer.encode(text) if uses_char_tokenizer(config) \
        else tokenizer.encode(text, add_special_tokens=False)
    bos = data.leading_bos(tokenizer)
    if isinstance(example, data.Chat) or bos is None:
        return ids
    return [bos] + ids
