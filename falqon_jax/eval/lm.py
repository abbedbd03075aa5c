"""The project's model as an lm-evaluation-harness language model: :class:`FalqonLM`, an
``lm_eval.api.model.TemplateLM`` (needs the ``eval`` extra).

Text is tokenized as the harness's ``hf`` backend (``HFLM``) tokenizes it, so the same
requests score the same tokens: a context and its continuation are encoded together and
split (``TemplateLM._encode_pair``: the context's trailing whitespace moves to the
continuation), the tokenizer's own special tokens are added (a LLaMA tokenizer's BOS; none
for SmolLM2's) unless the text starts with the BOS text already, an empty context becomes
the prefix token (BOS, else EOS), ``loglikelihood_rolling`` scores disjoint windows of the
model's context length, and ``generate_until`` left-truncates prompts to leave room for
``max_gen_toks`` tokens, decodes without special tokens and cuts the text at the first stop
sequence (the EOS text among them). The token-level work is :class:`~falqon_jax.eval.scoring.
Scorer`'s.

Besides Hugging Face tokenizers, the demo's character tokenizer
(:class:`~falqon_jax.train.demo_data.CharTokenizer`) works: its "special tokens" are the
BOS a training run puts in front of a record (:func:`~falqon_jax.train.data.leading_bos`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from falqon_jax.eval.scoring import RequestError, Scorer
from falqon_jax.train.data import leading_bos

MAX_GEN_TOKS = 256  # the hf backend's default for generate_until


class Codec:
    """Text <-> ids for a Hugging Face tokenizer or the demo's character tokenizer, with
    the Hugging Face tokenizer's conventions (``add_special_tokens``,
    ``skip_special_tokens``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.hf = hasattr(tokenizer, "convert_ids_to_tokens")
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (self.eos_id or 0)
        self._leading = None if self.hf else leading_bos(tokenizer)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Ids of ``text``; ``add_special_tokens=None`` is the tokenizer's default (on)."""
        if self.hf:
            if add_special_tokens is None:
                return list(self.tokenizer.encode(text))
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        ids = list(self.tokenizer.encode(text))
        if add_special_tokens is not False and self._leading is not None:
            ids = [self._leading] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self.hf:
            return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(list(ids))

    @property
    def size(self) -> int:
        """The number of ids the tokenizer can produce."""
        return len(self.tokenizer) if self.hf else int(self.tokenizer.vocab_size)


class FalqonLM(TemplateLM):
    """``module`` with ``params`` (a :class:`~falqon_jax.model.llama.Llama`, e.g.
    ``load_any(...).model``'s) and ``tokenizer``, for ``lm_eval.simple_evaluate``.

    ``batch_size``, ``max_length`` and ``mesh`` are :class:`~falqon_jax.eval.scoring.
    Scorer`'s; ``info``: what :meth:`get_model_info` adds to the results' ``config``.
    """

    def __init__(self, module: Any, params: Any, tokenizer: Any, *, batch_size: int = 16,
                 max_length: int | None = None, mesh: Any = None,
                 info: dict[str, Any] | None = None, progress: bool = True) -> None:
        super().__init__()
        self.codec = Codec(tokenizer)
        self.tokenizer = tokenizer
        vocab = module.config.vocab_size
        if self.codec.size > vocab:
            raise ValueError(f"the tokenizer has {self.codec.size} tokens but the model only "
                             f"{vocab}: pass the model's own tokenizer")
        if self.codec.eos_id is None:
            raise ValueError("the tokenizer has no end-of-sequence token")
        self.scorer = Scorer(module, params, batch_size=batch_size, max_length=max_length,
                             mesh=mesh, pad_id=self.codec.pad_id, progress=progress)
        eos = module.config.eos_token_id
        model_eos = (eos,) if isinstance(eos, int) else tuple(eos or ())
        self.eos_ids = tuple(dict.fromkeys((self.codec.eos_id, *model_eos)))
        self.info = dict(info or {})
        self.batch_size = self.scorer.rows

    # ----------------------------------------------------------------------------------
    # What TemplateLM asks for.

    @property
    def eot_token_id(self) -> int:
        return self.codec.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context becomes, and the first window of
        ``loglikelihood_rolling`` starts with: BOS, else EOS (as the hf backend)."""
        return self.codec.bos_id if self.codec.bos_id is not None else self.codec.eos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None and self.codec.hf and has_bos_prefix(
                string, self.codec.decode([self.prefix_token_id], skip_special_tokens=False)):
            add_special_tokens = False  # the text holds its BOS already
        ids = self.codec.encode(string, add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.codec.decode(tokens, skip_special_tokens)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)
                   ).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        return dict(self.info)

    # ----------------------------------------------------------------------------------
    # The three request types.

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int],
                                                         list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        answers = self.scorer.loglikelihoods([(ctx, cont) for _, ctx, cont in requests],
                                             desc="loglikelihood")
        for (strings, _, _), answer in zip(requests, answers, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        """Each text's log-likelihood over disjoint windows of ``max_length`` tokens, the
        first starting with the prefix token, as the hf backend computes it."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window,
                                             lm_utils.get_rolling_token_windows(
                                                 token_list=self.tok_encode(string),
                                                 prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length,
                                                 context_len=1)):
                windows.append((context, continuation))
                owners.append(i)
        scores = self.scorer.loglikelihoods(windows, desc="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, scores, strict=True):
            totals[i] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (sampled where a task asks for ``do_sample`` with a
        temperature; ``top_p`` is honoured, other sampling settings are not), cut at the
        first stop sequence. Requests are grouped by their generation settings."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = json.dumps(req.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        results: list[str] = [""] * len(requests)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for members in groups.values():
            settings = requests[members[0]].args[1]
            if not isinstance(settings, dict):
                raise RequestError(f"generation settings must be a dict, got {settings!r}")
            kwargs = normalize_gen_kwargs(settings, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            new = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - new
            if room <= 0:
                raise RequestError(f"max_gen_toks {new} leaves no room for a prompt within "
                                   f"the model's {self.max_length} tokens (--max-length)")
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0)) > 0
            top_p = float(kwargs.get("top_p") or 1.0) if sample else 1.0
            if not 0 < top_p <= 1:
                raise RequestError(f"top_p must be in (0, 1], got {top_p}")
            prompts = []
            for i in members:
                ids = self.tok_encode(requests[i].args[0], left_truncate_len=room)
                prompts.append(ids or [self.prefix_token_id])
            outs = self.scorer.generate(
                prompts, new, eos_ids=self.eos_ids,
                temperature=float(kwargs.get("temperature", 0.0)) if sample else 0.0,
                top_p=top_p, desc="generate_until")
            for i, out in zip(members, outs, strict=True):
                text = postprocess_generated_text(self.tok_decode(out), until, None)
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results
