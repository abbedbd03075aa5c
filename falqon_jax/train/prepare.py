"""What a run starts from (:func:`prepare` -> :class:`Prepared`): its examples read,
checked and tokenized, its tokenizer and its model, each checked before the next (slower)
step, so a mistake ends in one line (:class:`~falqon_jax.train.outcome.UserError`,
:class:`~falqon_jax.train.data.DataError`) before weights are read. Also ``--init-a grad``'s
starting ``A`` (:func:`gradient_aligned_params`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from falqon_jax import rules
from falqon_jax.melded import is_melded, lora_row_norm
from falqon_jax.model.attention import choose
from falqon_jax.model.config import LlamaConfig, load_card
from falqon_jax.model.loading import load_model
from falqon_jax.model.methods import linear_method, training_method
from falqon_jax.model.resolve import (
    classify,
    model_directory,
    tokenizer_directory,
    tokenizer_missing,
)
from falqon_jax.train import data, grad_init
from falqon_jax.train.config import TrainConfig, length_buckets
from falqon_jax.train.data import DataError, batch_stream
from falqon_jax.train.demo_data import CharTokenizer, make_examples
from falqon_jax.train.outcome import UserError
from falqon_jax.train.trainer import token_loss_sum


@dataclass
class Prepared:
    config: TrainConfig
    model: Any
    tokenizer: Any
    train: list
    held_out: list
    held_out_examples: list
    truncated: int
    dropped: int


def prepare(config: TrainConfig, mesh: Any = None) -> Prepared:
    """The run's examples (those with a response), tokenizer and model, checked against each
    other, and the examples tokenized as the run trains on them. With ``mesh``, the model's
    params are loaded already split over it as the trainer keeps them."""
    check_model_source(config)
    train_ex, held_ex = train_and_held_out(config)
    kept = [e for e in train_ex if has_response(e)]
    held_kept = [e for e in held_ex if has_response(e)]
    check_enough_examples(config, train_ex, held_ex, kept, held_kept)
    tokenizer = load_tokenizer(config)
    check_chat_template(config, tokenizer, kept + held_kept)
    model = load_model_to_train(config, mesh)
    check_model_limits(config, model, tokenizer)
    tokenize = example_tokenizer(config, tokenizer)
    train = [tokenize(e) for e in kept]
    held_out = [tokenize(e) for e in held_kept]
    truncated = sum(t.truncated for t in train)
    return Prepared(config, model, tokenizer, train, held_out, held_kept, truncated,
                    dropped=len(train_ex) - len(kept))


# --------------------------------------------------------------------------------------
# Examples.


def train_and_held_out(config: TrainConfig) -> tuple[list, list]:
    """The training and held-out examples: the demo's, or ``--data`` split by ``--eval-size``."""
    if config.is_demo:
        return make_examples()
    examples = data.read_examples(config.data, split=config.data_split,
                                  config=config.data_config)
    return data.split(examples, config.eval_size, config.seed)


def has_response(example: Any) -> bool:
    """Whether ``example`` has something to train on (examples without are dropped)."""
    if isinstance(example, data.Chat):
        return example.has_response()
    return any(s.trained and s.text.strip() for s in example)


def check_enough_examples(config: TrainConfig, train_ex: list, held_ex: list, kept: list,
                          held_kept: list) -> None:
    """At least one batch of examples with a response to train on; else a ``DataError``
    saying why (held out, empty responses) and what to change."""
    if len(kept) >= config.batch_size:
        return
    dropped = len(train_ex) - len(kept)
    total, usable = len(train_ex) + len(held_ex), len(kept) + len(held_kept)
    why = []
    if held_ex:
        share = f"all {total}" if not train_ex else f"{len(held_ex)} of its {total}"
        why.append(f"{share} examples are held out for eval loss "
                   f"(--eval-size {config.eval_size})")
    if dropped:
        why.append(f"{dropped} have empty responses")
    because = f": {' and '.join(why)}" if why else ""
    # --eval-size is honoured as given (it is part of a run's identity); name a value
    # that holds out about a tenth and leaves at least one batch to train on.
    if held_ex and usable > config.batch_size:
        fix = (f"pass a smaller --eval-size, e.g. --eval-size "
               f"{min(max(1, total // 10), usable - config.batch_size)}, or add data")
    else:
        fix = f"lower --batch-size{' and --eval-size' if held_ex else ''} or add data"
    if not kept:
        raise DataError(f"no training examples left in {config.data}{because}; {fix}")
    raise DataError(f"only {len(kept)} training examples in {config.data} for "
                    f"--batch-size {config.batch_size}{because}; {fix}")


def check_chat_template(config: TrainConfig, tokenizer: Any, examples: list) -> None:
    """Chat records need a tokenizer with a chat template."""
    if any(isinstance(e, data.Chat) for e in examples) \
            and not data.has_chat_template(tokenizer):
        raise UserError(
            f"{config.data} holds chat records (\"messages\") but the tokenizer "
            f"({config.tokenizer_source}) has no chat template; pass --tokenizer DIR with "
            "one (a chat_template in tokenizer_config.json or chat_template.jinja)")


def example_tokenizer(config: TrainConfig, tokenizer: Any) -> Callable[[Any], data.Tokenized]:
    """Tokenizes one example as the run trains on it: a chat as its template renders it,
    other formats with a BOS in front where the tokenizer adds one and its EOS after."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) \
            if not uses_char_tokenizer(config) else tokenizer.encode(text)

    lengths = {"source_len": config.source_len, "target_len": config.target_len}
    bos_id = data.leading_bos(tokenizer)

    def tokenize_one(item: Any) -> data.Tokenized:
        if isinstance(item, data.Chat):
            return data.tokenize_rendered(data.render_chat(item, tokenizer), tokenizer, **lengths)
        return data.tokenize_example(item, encode, bos_id=bos_id,
                                     eos_id=tokenizer.eos_token_id, **lengths)

    return tokenize_one


# --------------------------------------------------------------------------------------
# The tokenizer.

CHAR_TOKENIZER = "char"


def uses_char_tokenizer(config: TrainConfig) -> bool:
    """Whether the run uses the built-in character tokenizer (the demo, or ``--tokenizer
    char``): it encodes without ``add_special_tokens`` and decodes without options."""
    return config.is_demo or config.tokenizer == CHAR_TOKENIZER


def load_tokenizer(config: TrainConfig) -> Any:
    """The run's tokenizer: the demo's character tokenizer, or the Hugging Face tokenizer of
    ``--tokenizer`` or ``--model`` (a directory, a Hub name or a card's Hub source)."""
    if uses_char_tokenizer(config):
        return CharTokenizer()
    fix = "pass --tokenizer DIR, a directory or Hugging Face Hub name with the model's tokenizer"
    try:
        source = tokenizer_directory(config.tokenizer_source)
    except ValueError as err:
        first = str(err).splitlines()[0]
        no_files = "has no tokenizer files" in first and not config.tokenizer
        raise UserError(f"{first}; {fix}" if no_files else first) from None
    if source is None:
        raise UserError(
            f"--model {config.model} is a model card without a tokenizer (it names no Hub "
            "source): pass --tokenizer DIR"
        )
    missing = tokenizer_missing(source)
    if missing and config.tokenizer:
        raise UserError(f"--tokenizer {config.tokenizer} {missing}")
    if missing:
        raise UserError(f"--model {config.model} {missing}; {fix}")
    # Imported here: transformers takes seconds to import and only Hugging Face tokenizers
    # need it (the demo and --tokenizer char do not).
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load a tokenizer from {config.tokenizer_source}: {first}"
                        ) from None


# --------------------------------------------------------------------------------------
# The model.


def attention_kernel(config: TrainConfig) -> str:
    """``--attention`` resolved for this process's devices (``UserError`` where the one
    asked for cannot run)."""
    try:
        return choose(config.attention, jax.devices()[0].platform, config.dtype)
    except ValueError as err:
        raise UserError(str(err)) from None


def load_model_to_train(config: TrainConfig, mesh: Any = None) -> Any:
    """The model of ``--model`` with ``--method``'s linear layers on its ``--targets``; with
    ``mesh`` (the run's, :func:`falqon_jax.train.loop.build_mesh`), every param created
    already split over it by the partition rules, so no device ever holds the whole model."""
    method = linear_method(config)
    attention = attention_kernel(config)
    try:
        return load_model(
            config.model, method=method, rank=config.rank, alpha=config.alpha,
            dtype=config.dtype, targets=config.targets, init=config.init, seed=config.seed,
            remat=config.remat, attention=attention, mesh=mesh,
        )
    except (ValueError, OSError) as err:
        raise UserError(str(err).splitlines()[0]) from None


def check_model_limits(config: TrainConfig, model: Any, tokenizer: Any) -> None:
    """The tokenizer fits the model's vocabulary, FALQON has a layer to convert and
    ``--top-k`` fits the smallest melded layer."""
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    if vocab > model.config.vocab_size:
        raise UserError(
            f"the tokenizer has {vocab} tokens but the model only {model.config.vocab_size}; "
            "pass the checkpoint's own tokenizer with --tokenizer"
        )
    melded = [leaf for leaf in jax.tree.leaves(model.params, is_leaf=is_melded) if is_melded(leaf)]
    if training_method(config).melded and not melded:
        raise UserError("no layer of this model could be converted to FALQON (dims % 16 != 0)")
    if melded and rules.get(config.rule).uses_top_k:
        smallest = min(leaf.out for leaf in melded)
        if config.top_k > smallest:
            raise UserError(
                f"--top-k {config.top_k} exceeds the {smallest} rows of the smallest melded "
                "layer; lower --top-k"
            )


def check_model_source(config: TrainConfig) -> None:
    """Fail fast, before the data is read or weights are downloaded, on an unknown card, a
    card without weights, a directory that is not a LLaMA checkpoint, or a Hub name that
    cannot be used (this fetches the Hub model's config and tokenizer files only)."""
    try:
        if classify(config.model) == "card" and config.init == "random":
            load_card(config.model)
        else:
            LlamaConfig.from_hf(model_directory(config.model, weights=False))
    except (ValueError, OSError) as err:
        raise UserError(str(err).splitlines()[0]) from None


GRAD_INIT_BATCHES = 4


def gradient_aligned_params(config: TrainConfig, prep: Prepared, pad_id: int) -> Any:
    """``--init-a grad``: the FALQON params with every ``A`` set to the top right singular
    vectors of the dense weight's loss gradient over the first ``GRAD_INIT_BATCHES``
    training batches (:mod:`falqon_jax.train.grad_init`)."""
    try:
        dense = load_model(config.model, method="full", dtype=config.dtype,
                           targets=config.targets, init=config.init, seed=config.seed,
                           attention=attention_kernel(config))
    except (ValueError, OSError) as err:
        raise UserError(str(err).splitlines()[0]) from None
    stream = batch_stream(prep.train, config.batch_size, config.seed, pad_id=pad_id,
                          buckets=length_buckets(config))
    batches = [next(stream) for _ in range(GRAD_INIT_BATCHES)]

    def forward(params, tokens, attention):
        return dense.module.apply({"params": params}, tokens, attention)

    grads = grad_init.dense_gradients(
        forward, dense.params,
        [(jnp.asarray(b.tokens), jnp.asarray(b.mask), jnp.asarray(b.attention)) for b in batches],
        token_loss_sum)

    def norm(in_features: int, rank: int) -> float | None:
        if config.a_scale != "lora":
            return 1.0  # orthonormal rows, as the SVD gives them
        return config.a_gain * lora_row_norm(in_features, rank, config.alpha)

    return grad_init.realign(prep.model.params, dense.params, grads, norm)
