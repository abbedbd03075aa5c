"""Data pipeline: formats, templates, loss masks, truncation, batching, bad input."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from falqon_jax.train import data
from falqon_jax.train.demo_data import CharTokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
ALPACA = SHARED / "data" / "alpaca_data_1k.json"
LLAMA_TOKENIZER = SHARED / "tokenizers" / "llama"
needs_alpaca = pytest.mark.skipif(not ALPACA.is_file(), reason="../shared/data not present")
needs_llama_tokenizer = pytest.mark.skipif(
    not (ALPACA.is_file() and LLAMA_TOKENIZER.is_dir()), reason="../shared not present")


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@needs_alpaca
def test_alpaca_file_uses_the_alpaca_template():
    examples = data.read_examples(ALPACA)
    assert len(examples) == 1000
    raw = json.loads(ALPACA.read_text())
    with_input = next(i for i, r in enumerate(raw) if r["input"].strip())
    without = next(i for i, r in enumerate(raw) if not r["input"].strip())
    prompt, response = examples[with_input]
    assert not prompt.trained and response.trained
    assert prompt.text == data.ALPACA_WITH_INPUT.format(**raw[with_input])
    assert response.text == raw[with_input]["output"]
    assert examples[without][0].text == data.ALPACA_NO_INPUT.format(**raw[without])


def test_guanaco_turns_train_only_the_assistant(tmp_path):
    text = "### Human: hi ### Assistant: hello ### Human: more ### Assistant: sure"
    path = _write(tmp_path, "chat.jsonl", json.dumps({"text": text}) + "\n")
    (example,) = data.read_examples(path)
    assert "".join(s.text for s in example) == text
    trained = [s.text for s in example if s.trained]
    assert trained == [" hello ", " sure"]


def test_prompt_completion_jsonl(tmp_path):
    lines = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]
    path = _write(tmp_path, "pc.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    examples = data.read_examples(path)
    assert [[s.text for s in e] for e in examples] == [["2+2=", "4"], ["3+3=", "6"]]


def test_tokenize_masks_and_truncation():
    tok = CharTokenizer()
    example = [data.Segment("abcdef", False), data.Segment("XYZ", True)]
    t = data.tokenize_example(example, tok.encode, bos_id=1, eos_id=2, source_len=4, target_len=10)
    assert t.truncated  # BOS + 6 prompt chars > 4
    assert t.tokens.tolist() == [1] + tok.encode("abc") + tok.encode("XYZ") + [2]
    assert t.mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    short = data.tokenize_example(example, tok.encode, bos_id=1, eos_id=2, source_len=16,
                                  target_len=2)
    assert short.tokens.tolist()[-2:] == tok.encode("XY") and short.truncated


@needs_llama_tokenizer
def test_real_tokenizer_on_alpaca():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(LLAMA_TOKENIZER, local_files_only=True)
    examples = data.read_examples(ALPACA)[:50]

    def encode(text):
        return tok.encode(text, add_special_tokens=False)

    for e in examples:
        t = data.tokenize_example(e, encode, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                                  source_len=16, target_len=64)
        n_source = int(np.argmax(t.mask))
        assert t.tokens[0] == tok.bos_token_id and n_source <= 16
        assert np.all(t.mask[n_source:] == 1) and len(t.tokens) - n_source <= 64
        response = tok.decode(t.tokens[n_source:], skip_special_tokens=True)
        assert e[1].text.startswith(response.strip()[:20])


def test_batches_are_deterministic_and_resumable():
    tok = CharTokenizer()
    rng = np.random.default_rng(0)
    items = [data.tokenize_example([data.Segment("p" * int(n), False), data.Segment("r", True)],
                                   tok.encode, bos_id=1, eos_id=2, source_len=64, target_len=8)
             for n in rng.integers(1, 40, 100)]
    a = data.length_grouped_batches(items, 8, seed=3, epoch=0)
    assert a == data.length_grouped_batches(items, 8, seed=3, epoch=0)
    assert a != data.length_grouped_batches(items, 8, seed=4, epoch=0)
    assert all(len(b) == 8 for b in a) and len(a) == 100 // 8
    full = data.batch_stream(items, 8, 3, pad_id=0, buckets=(16, 80))
    first = [next(full) for _ in range(20)]  # crosses an epoch boundary (12 per epoch)
    resumed = data.batch_stream(items, 8, 3, pad_id=0, buckets=(16, 80), start_step=13)
    for want in first[13:]:
        got = next(resumed)
        np.testing.assert_array_equal(got.tokens, want.tokens)
    b = first[0]
    assert b.tokens.shape[1] in (16, 32, 64)  # power-of-two buckets
    assert data.bucket_length(70, 16, 80) == 80 and data.bucket_length(90, 16, 80) == 90
    assert np.all((b.tokens != 0) == (b.attention == 1))  # padding exactly where masked out


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": }]', "line 2"),
        ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n', "line 2"),
        ("fields.json", '[{"instruction": "a"}]', "'output' is missing"),
        ("types.jsonl", '{"prompt": 3, "completion": "b"}\n', "'prompt' is int"),
        ("keys.jsonl", '{"question": "a"}\n', "unknown record"),
        ("notobj.json", "[1, 2]", "expected a JSON object"),
        ("empty.json", "  \n", "is empty"),
        ("chat.jsonl", '{"text": "### Human: hi"}\n', "no '### Assistant:'"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, name, content, match):
    path = _write(tmp_path, name, content)
    with pytest.raises(data.DataError, match=match) as info:
        data.read_examples(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.read_examples(tmp_path / "nope.json")
    with pytest.raises(data.DataError, match="directory"):
        data.read_examples(tmp_path)


SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct"


@pytest.mark.skipif(not (LLAMA_TOKENIZER.is_dir() and SMOLLM2.is_dir()),
                    reason="shared tokenizers not present")
def test_a_text_record_gets_a_bos_only_where_the_tokenizer_adds_one():
    from transformers import AutoTokenizer

    from falqon_jax.train.config import DEMO
    from falqon_jax.train.samples import prompt_tokens

    smollm2 = AutoTokenizer.from_pretrained(SMOLLM2)  # names <|im_start|> as BOS, adds none
    llama = AutoTokenizer.from_pretrained(LLAMA_TOKENIZER, add_bos_token=True)  # adds <s>
    record = [data.Segment("Say hi.\n", False), data.Segment("hi", True)]
    for tok in (smollm2, llama):
        added = tok.encode("Say hi.")[:-len(tok.encode("Say hi.", add_special_tokens=False))]
        assert data.leading_bos(tok) == (added[0] if added else None)
        t = data.tokenize_example(record, lambda s, tok=tok: tok.encode(
            s, add_special_tokens=False), bos_id=data.leading_bos(tok),
            eos_id=tok.eos_token_id, source_len=16, target_len=16)
        assert t.tokens.tolist()[:len(added) + 1] == tok.encode("Say hi.\n")[:len(added) + 1]
        config = dataclasses.replace(DEMO, data="x.json", tokenizer="dir")
        assert prompt_tokens(record, tok, config) == tok.encode("Say hi.\n")
    assert data.leading_bos(smollm2) is None and data.leading_bos(llama) == 1
    assert data.leading_bos(CharTokenizer()) == CharTokenizer.bos_token_id  # the demo's
