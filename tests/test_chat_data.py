"""Chat-format data (``{"messages": [...]}`` JSONL) rendered with a real tokenizer's chat
template: SmolLM2-135M-Instruct's (ChatML, no BOS of its own), from ``../shared``.

The reference for the tokens is ``apply_chat_template(..., tokenize=True)`` itself; the
reference for the loss mask is computed at the token level from the template's renderings
of growing prefixes of the conversation, independently of the character offsets that
:func:`falqon_jax.train.data.tokenize_rendered` uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from falqon_jax.train import data
from falqon_jax.train.run import main

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOL = SHARED / "models" / "smollm2-135m-instruct"
LLAMA_TOKENIZER = SHARED / "tokenizers" / "llama"

CHATS = [
    [{"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"},
     {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome, of course.\n"}],
    [{"role": "user", "content": "Say hi"},
     {"role": "assistant", "content": "Hi! 👋"},
     {"role": "user", "content": "Thanks"}],  # a last user turn: rendered, never trained
]


@pytest.fixture(scope="module")
def smol():
    if not (SMOL / "tokenizer.json").exists():
        pytest.skip(f"{SMOL} is not available")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOL, local_files_only=True)


def _ids(encoded) -> list[int]:
    """``apply_chat_template(tokenize=True)`` gives a list or a BatchEncoding by version."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def reference_mask(messages: list[dict], tokenizer) -> np.ndarray:
    """1 for the tokens of each assistant turn: from the end of the template's generation
    prompt to the end of the turn's rendering, without the whitespace tokens after it."""
    def tokens(upto: int, prompt: bool) -> list[int]:
        return _ids(tokenizer.apply_chat_template(messages[:upto], tokenize=True,
                                                  add_generation_prompt=prompt))

    whole = tokens(len(messages), False)
    mask = np.zeros(len(whole), np.float32)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(tokens(i, True)), len(tokens(i + 1, False))
        while tokenizer.decode(whole[end - 1:end]).strip() == "":
            end -= 1
        mask[start:end] = 1.0
    return mask


def test_chat_records_are_read_as_conversations(tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    examples = data.read_examples(path)
    assert [type(e) for e in examples] == [data.Chat] * 3
    assert examples[1].messages[0] == ("system", "You answer in one word.")
    assert all(e.has_response() for e in examples)


@pytest.mark.parametrize("messages", CHATS, ids=["one-turn", "system+two-turns", "last-user"])
def test_rendered_tokens_are_the_templates_and_only_assistant_turns_train(smol, messages):
    chat = data.Chat(tuple((m["role"], m["content"]) for m in messages))
    segments = data.render_chat(chat, smol)
    assert "".join(s.text for s in segments) == smol.apply_chat_template(messages,
                                                                         tokenize=False)
    got = data.tokenize_rendered(segments, smol, source_len=512, target_len=512)
    want = _ids(smol.apply_chat_template(messages, tokenize=True))
    # Exactly the template's tokens: no BOS in front (SmolLM2's tokenizer adds none), no EOS.
    assert got.tokens.tolist() == want and not got.truncated
    assert smol("x")["input_ids"] == smol("x", add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(got.mask, reference_mask(messages, smol))
    trained = smol.decode([t for t, m in zip(got.tokens, got.mask, strict=True) if m])
    replies = [m["content"] + "<|im_end|>" for m in messages
               if m["role"] == "assistant"]
    assert trained == "".join(replies)


def test_truncation_keeps_the_prompt_head_and_the_reply_head(smol):
    messages = CHATS[1]
    chat = data.Chat(tuple((m["role"], m["content"]) for m in messages))
    full = data.tokenize_rendered(data.render_chat(chat, smol), smol, source_len=512,
                                  target_len=512)
    cut = data.tokenize_rendered(data.render_chat(chat, smol), smol, source_len=5,
                                 target_len=3)
    first = int(np.argmax(full.mask))
    assert cut.truncated
    assert cut.tokens.tolist() == full.tokens[:5].tolist() + full.tokens[first:first + 3].tolist()
    assert cut.mask.tolist() == [0.0] * 5 + full.mask[first:first + 3].tolist()


@pytest.mark.parametrize("record, message", [
    ({"messages": []}, "non-empty list"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
     "message 2 has role 'tool'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
     "message 1's content is missing"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]},
     "message 2's content is int"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "starts with an assistant"),
    ({"messages": [["user", "a"]]}, "message 1 is list"),
])
def test_bad_chat_records_are_one_line_errors(tmp_path, record, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHATS[0]}, record])
    with pytest.raises(data.DataError, match=message) as err:
        data.read_examples(path)
    assert "\n" not in str(err.value) and "line 2" in str(err.value)


class _ReorderingTemplate:
    """A template that renders the last message first: no turn-by-turn prefix property."""

    chat_template = "reversed"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        text = "".join(f"[{m['role']}] {m['content']}\n" for m in reversed(messages))
        return text + ("[assistant] " if add_generation_prompt else "")


def test_a_template_that_is_not_turn_by_turn_is_refused():
    chat = data.Chat((("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
                     "x line 1")
    with pytest.raises(data.DataError, match="x line 1: .* not render this conversation turn"):
        data.render_chat(chat, _ReorderingTemplate())


def _chat_card(tmp_path: Path, monkeypatch) -> None:
    """A tiny random LLaMA card with SmolLM2's vocabulary size, for training runs."""
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "chat-tiny.toml").write_text(
        'description = "tiny, SmolLM2 vocabulary"\nvocab_size = 49152\nhidden_size = 64\n'
        "intermediate_size = 176\nnum_layers = 2\nnum_heads = 4\nnum_kv_heads = 2\n"
        "head_dim = 16\nrms_norm_eps = 1e-5\nrope_theta = 10000.0\n"
        "max_position_embeddings = 512\ntie_word_embeddings = true\n"
        "bos_token_id = 1\neos_token_id = 2\n")
    monkeypatch.setenv("FALQON_MODELS_DIR", str(cards))


def test_training_on_chat_data_with_smollm2s_tokenizer(smol, tmp_path, monkeypatch, capsys):
    _chat_card(tmp_path, monkeypatch)
    records = [{"messages": CHATS[i % 3]} for i in range(12)]
    path = _write_jsonl(tmp_path / "chat.jsonl", records)
    out = tmp_path / "run"
    code = main(["--model", "chat-tiny", "--init", "random", "--tokenizer", str(SMOL),
                 "--data", str(path), "--eval-size", "4", "--batch-size", "4", "--steps", "2",
                 "--source-len", "64", "--target-len", "32", "--rank", "8", "--dtype",
                 "float32", "--sample-tokens", "2", "--log-every", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # The sample prompt is the conversation rendered up to the assistant's turn.
    assert "sample: '<|im_start|>system\\n" in printed
    assert "<|im_start|>assistant\\n' ->" in printed


def test_chat_data_with_a_tokenizer_without_template_is_a_one_line_error(tmp_path, capsys):
    if not (LLAMA_TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"{LLAMA_TOKENIZER} is not available")
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[0]}] * 8)
    out = tmp_path / "run"
    code = main(["--model", "tiny", "--init", "random", "--tokenizer", str(LLAMA_TOKENIZER),
                 "--data", str(path), "--eval-size", "2", "--batch-size", "2", "--steps", "1",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "has no chat template" in err and "--tokenizer" in err
    assert not out.exists()
