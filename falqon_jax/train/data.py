"""Instruction data: record formats, prompt templates, tokenization, loss masks and batching.

Records come from a local file or directory or a Hugging Face Hub data set
(:mod:`falqon_jax.train.records`); their format is detected from their fields (a table's
from its columns):

* Alpaca -- ``{"instruction", "input", "output"}`` (``input`` may be empty or missing; e.g.
  Alpaca JSON, ``tatsu-lab/alpaca``), rendered with the Alpaca prompt template;
* OpenAssistant/Guanaco -- ``{"text": "### Human: ... ### Assistant: ..."}`` (e.g.
  ``timdettmers/openassistant-guanaco``); the loss covers the assistant turns only;
* chat -- ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` (the
  conversational format of Hugging Face's TRL; e.g. ``HuggingFaceH4/no_robots``), rendered
  with the tokenizer's own chat template (:func:`render_chat`); the loss covers the assistant
  turns only;
* prompt/completion -- ``{"prompt": ..., "completion": ...}``.

Each example becomes ``(tokens, loss_mask)``: the prompt (source) is truncated to
``source_len`` tokens and carries no loss, the response (target) is truncated to
``target_len`` tokens and carries the loss, as in QLoRA's and FALQON's training code. Text
formats get a BOS in front where the tokenizer itself adds one (:func:`leading_bos`) and EOS
after each response; a chat gets exactly the tokens of its rendered template (which carries
its own markers), nothing added.

Errors in user data raise :class:`DataError` with a one-line message naming the file and line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from falqon_jax.train.records import DataError, read_records

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
HUMAN, ASSISTANT = "### Human:", "### Assistant:"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Segment:
    """A piece of an example's text and whether the loss covers it."""

    text: str
    trained: bool


Example = list[Segment]


@dataclass(frozen=True)
class Chat:
    """A conversation record: ``(role, content)`` pairs, rendered only once a tokenizer is
    known (:func:`render_chat`). ``where`` names the record in error messages."""

    messages: tuple[tuple[str, str], ...]
    where: str = field(default="chat", compare=False)

    def has_response(self) -> bool:
        """Whether an assistant turn has text to train on."""
        return any(role == "assistant" and content.strip() for role, content in self.messages)


# --------------------------------------------------------------------------------------
# Reading files.


FORMATS = ("instruction/input/output (Alpaca), text (### Human:/### Assistant:), messages (chat) "
           "or prompt/completion")


def read_examples(data: str | Path, *, split: str = "train",
                  config: str | None = None) -> list[Example | Chat]:
    """Read a data set's records into examples (a :class:`Chat` per chat record).

    ``data``: an Alpaca JSON, Guanaco / chat / prompt-completion JSONL, Parquet or Arrow
    file, a data set directory, or a Hugging Face Hub data set name (``org/name[@revision]``)
    with ``split`` and ``config`` (see :func:`falqon_jax.train.records.read_records`). The
    format is detected per record; a table whose columns fit no format is refused at once,
    naming its columns.
    """
    records = read_records(data, split=split, config=config)
    if records.columns is not None and _format(records.columns) is None:
        raise DataError(f"{records.label} has columns {', '.join(records.columns)}; expected "
                        f"{FORMATS}")
    return [_to_example(record, records.where(i)) for i, record in enumerate(records.rows)]


def _format(keys: Iterable[str]) -> str | None:
    """The record format that ``keys`` (a record's keys or a table's columns) select."""
    keys = set(keys)
    if "messages" in keys:
        return "chat"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "guanaco"
    if "prompt" in keys or "completion" in keys:
        return "prompt_completion"
    return None


def _to_example(record: object, where: str) -> Example | Chat:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    kind = _format(record)
    if kind == "chat":
        return _chat(record, where)
    if kind == "alpaca":
        return _alpaca(record, where)
    if kind == "guanaco":
        return _guanaco(record, where)
    if kind == "prompt_completion":
        prompt, completion = _fields(record, where, "prompt", "completion")
        return [Segment(prompt, False), Segment(completion, True)]
    raise DataError(f"{where}: unknown record with keys {sorted(record)}; expected {FORMATS}")


def _fields(record: dict, where: str, *names: str) -> list[str]:
    values = []
    for name in names:
        value = record.get(name)
        if not isinstance(value, str):
            problem = "is missing" if value is None else f"is {type(value).__name__}, not text"
            raise DataError(f"{where}: field '{name}' {problem}")
        values.append(value)
    return values


def _alpaca(record: dict, where: str) -> Example:
    instruction, output = _fields(record, where, "instruction", "output")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' is {type(extra).__name__}, not text")
    template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
    prompt = template.format(instruction=instruction, input=extra)
    return [Segment(prompt, False), Segment(output, True)]


def _guanaco(record: dict, where: str) -> Example:
    (text,) = _fields(record, where, "text")
    if ASSISTANT not in text:
        raise DataError(f"{where}: 'text' has no '{ASSISTANT}' turn to train on")
    segments: list[Segment] = []
    rest = text
    while rest:
        start = rest.find(ASSISTANT)
        if start < 0:
            segments.append(Segment(rest, False))
            break
        head = start + len(ASSISTANT)
        segments.append(Segment(rest[:head], False))
        end = rest.find(HUMAN, head)
        end = len(rest) if end < 0 else end
        segments.append(Segment(rest[head:end], True))
        rest = rest[end:]
    return [s for s in segments if s.text]


def _chat(record: dict, where: str) -> Chat:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...} objects")
    pairs = []
    for j, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {j} is {type(message).__name__}, not an object "
                            "with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {j} has role {role!r}; use one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(content, str):
            problem = "is missing" if content is None else f"is {type(content).__name__}"
            raise DataError(f"{where}: message {j}'s content {problem}; it must be text")
        pairs.append((role, content))
    if pairs[0][0] == "assistant":
        raise DataError(f"{where}: the conversation starts with an assistant message; put the "
                        "user (or system) message it answers before it")
    if not any(role == "assistant" for role, _ in pairs):
        raise DataError(f"{where}: no assistant message to train on")
    return Chat(tuple(pairs), where)


# --------------------------------------------------------------------------------------
# Chat templates.


def leading_bos(tokenizer: Any) -> int | None:
    """The BOS id to put in front of a text record: the one the tokenizer itself adds when
    it encodes with its special tokens, else ``None``.

    The LLaMA tokenizer adds ``<s>``; SmolLM2's adds nothing, although it names
    ``<|im_start|>`` as its ``bos_token``, so its records get no BOS. A tokenizer that is
    not a Hugging Face one (the demo's :class:`~falqon_jax.train.demo_data.CharTokenizer`)
    gets its ``bos_token_id``.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or not hasattr(tokenizer, "convert_ids_to_tokens"):
        return bos
    probe = "a"
    with_special = tokenizer.encode(probe, add_special_tokens=True)
    without = tokenizer.encode(probe, add_special_tokens=False)
    adds = with_special[:1] == [bos] and without[:1] != [bos]
    return bos if adds else None


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` (a Hugging Face tokenizer) has a chat template to render with."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(chat: Chat, tokenizer: Any) -> Example:
    """The conversation as the tokenizer's chat template renders it, cut into segments.

    Each assistant turn's text -- what the template writes after the generation prompt
    (``add_generation_prompt=True`` of the turns before it), i.e. the reply and the
    template's end-of-turn marker, without trailing whitespace -- carries the loss; the
    system and user turns and the template's headers do not. The segments concatenate to
    ``apply_chat_template(messages, tokenize=False)`` exactly.

    Raises :class:`DataError` if the template does not render the conversation turn by turn
    (an earlier rendering is not a prefix of a later one), so the assistant turns cannot be
    located.
    """
    messages = [{"role": role, "content": content} for role, content in chat.messages]

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                             add_generation_prompt=generation_prompt)

    def refuse() -> DataError:
        return DataError(f"{chat.where}: the tokenizer's chat template does not render this "
                         "conversation turn by turn, so its assistant turns cannot be located")

    segments: list[Segment] = []
    done = ""
    for i, (role, _) in enumerate(chat.messages):
        if role != "assistant":
            continue
        prompt, full = render(i, True), render(i + 1, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise refuse()
        reply = full[len(prompt):]
        body = reply.rstrip()
        segments += [Segment(prompt[len(done):], False), Segment(body, True),
                     Segment(reply[len(body):], False)]
        done = full
    whole = render(len(messages), False)
    if not whole.startswith(done):
        raise refuse()
    segments.append(Segment(whole[len(done):], False))
    return [s for s in segments if s.text]


# --------------------------------------------------------------------------------------
# Tokenization.


@dataclass(frozen=True)
class Tokenized:
    """One example: int32 token ids and a float32 loss mask of the same length (1 = trained).

    ``mask[i]`` refers to predicting ``tokens[i]`` from the tokens before it.
    """

    tokens: np.ndarray
    mask: np.ndarray
    truncated: bool


def tokenize_example(
    example: Example,
    encode: Callable[[str], list[int]],
    *,
    bos_id: int | None,
    eos_id: int | None,
    source_len: int,
    target_len: int,
) -> Tokenized:
    """Tokenize segments; the untrained (source) part keeps its first ``source_len`` tokens
    (BOS included) and the trained (target) part, EOS appended, its first ``target_len``."""
    tokens, mask = _interleave(example, encode, bos_id, eos_id)
    return _truncate(tokens, mask, source_len, target_len)


def tokenize_rendered(
    example: Example, tokenizer: Any, *, source_len: int, target_len: int
) -> Tokenized:
    """Tokenize a rendered chat (:func:`render_chat`) as one string, so the tokens are exactly
    those of ``apply_chat_template(messages, tokenize=True)``; no BOS or EOS is added (the
    template carries its own markers). A token carries the loss when its first character
    lies in a trained segment. Truncation as in :func:`tokenize_example`."""
    text = "".join(s.text for s in example)
    trained = np.zeros(len(text) + 1, bool)
    start = 0
    for segment in example:
        trained[start:start + len(segment.text)] = segment.trained
        start += len(segment.text)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tokens = np.asarray(encoded["input_ids"], np.int64)
        mask = np.asarray([trained[first] for first, _ in encoded["offset_mapping"]], np.float32)
    else:  # no character offsets: tokenize segment by segment
        tokens, mask = _interleave(
            example, lambda s: tokenizer.encode(s, add_special_tokens=False), None, None)
    return _truncate(tokens, mask, source_len, target_len)


def _truncate(tokens: np.ndarray, mask: np.ndarray, source_len: int,
              target_len: int) -> Tokenized:
    """Keep the untrained prefix's first ``source_len`` tokens and the rest's first
    ``target_len``."""
    # Later untrained turns of a multi-turn chat stay in the target part, masked.
    first_trained = int(np.argmax(mask)) if mask.any() else len(tokens)
    src_tokens, src_mask = tokens[:first_trained], mask[:first_trained]
    tgt_tokens, tgt_mask = tokens[first_trained:], mask[first_trained:]
    truncated = len(src_tokens) > source_len or len(tgt_tokens) > target_len
    tokens = np.concatenate([src_tokens[:source_len], tgt_tokens[:target_len]])
    mask = np.concatenate([src_mask[:source_len], tgt_mask[:target_len]])
    return Tokenized(tokens.astype(np.int32), mask.astype(np.float32), truncated)


def _interleave(example, encode, bos_id, eos_id) -> tuple[np.ndarray, np.ndarray]:
    tokens: list[int] = [] if bos_id is None else [bos_id]
    mask: list[float] = [0.0] * len(tokens)
    for segment in example:
        ids = encode(segment.text)
        if segment.trained and eos_id is not None:
            ids = ids + [eos_id]
        tokens.extend(ids)
        mask.extend([1.0 if segment.trained else 0.0] * len(ids))
    return np.asarray(tokens, np.int64), np.asarray(mask, np.float32)


# --------------------------------------------------------------------------------------
# Splitting and batching.


def split(items: Sequence, eval_size: int, seed: int) -> tuple[list, list]:
    """Deterministic shuffle by ``seed``, then ``(train, held_out)`` with ``eval_size`` held out."""
    order = np.random.default_rng(seed).permutation(len(items))
    held = [items[i] for i in order[:eval_size]]
    train = [items[i] for i in order[eval_size:]]
    return train, held


@dataclass(frozen=True)
class Batch:
    """``tokens`` int32 ``[B, L]``, ``mask`` float32 ``[B, L]`` (loss), ``attention`` int32
    ``[B, L]`` (1 for real tokens, 0 for right padding). ``L`` is a length bucket."""

    tokens: np.ndarray
    mask: np.ndarray
    attention: np.ndarray


def bucket_length(longest: int, minimum: int, maximum: int) -> int:
    """The padded length for a batch whose longest example has ``longest`` tokens: the next
    power of two, clipped to ``[minimum, maximum]``. Few distinct lengths mean few compiled
    programs."""
    return min(max(minimum, 1 << max(longest - 1, 0).bit_length()), max(maximum, longest))


def collate(examples: Sequence[Tokenized], pad_id: int, buckets: tuple[int, int]) -> Batch:
    """Right-pad examples to :func:`bucket_length` (``buckets = (minimum, maximum)``) of the
    batch's longest example."""
    length = bucket_length(max(len(e.tokens) for e in examples), *buckets)
    tokens = np.full((len(examples), length), pad_id, np.int32)
    mask = np.zeros((len(examples), length), np.float32)
    attention = np.zeros((len(examples), length), np.int32)
    for row, e in enumerate(examples):
        n = len(e.tokens)
        tokens[row, :n], mask[row, :n], attention[row, :n] = e.tokens, e.mask, 1
    return Batch(tokens, mask, attention)


def length_grouped_batches(
    examples: Sequence[Tokenized], batch_size: int, seed: int, epoch: int, group: int = 16
) -> list[list[int]]:
    """Index batches for one epoch: shuffle by ``(seed, epoch)``, sort windows of
    ``group * batch_size`` examples by length (less padding), cut into batches, and shuffle the
    batch order. The last incomplete batch is dropped. Deterministic."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(examples))
    window = group * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i].tokens))
        batches.extend(
            [int(i) for i in chunk[j : j + batch_size]]
            for j in range(0, len(chunk) - batch_size + 1, batch_size)
        )
    rng.shuffle(batches)
    return batches


def batch_stream(
    examples: Sequence[Tokenized], batch_size: int, seed: int, *, pad_id: int,
    buckets: tuple[int, int],
    start_step: int = 0,
) -> Iterator[Batch]:
    """Endless, deterministic stream of batches, beginning at global batch ``start_step``
    (so a resumed run sees exactly the batches the uninterrupted run would have)."""
    if len(examples) < batch_size:
        raise DataError(
            f"only {len(examples)} training examples for batch size {batch_size}; "
            "lower --batch-size or add data"
        )
    per_epoch = len(length_grouped_batches(examples, batch_size, seed, 0))
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        for indices in length_grouped_batches(examples, batch_size, seed, epoch)[offset:]:
            yield collate([examples[i] for i in indices], pad_id, buckets)
        epoch, offset = epoch + 1, 0
