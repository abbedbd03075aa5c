"""Generation: greedy decoding against transformers, the KV cache against the full forward,
top-p sampling, EOS handling and the ``python -m falqon_jax.generate`` command line (text,
chat and token-id prompts; models by Hub name)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from falqon_jax import load_model
from falqon_jax.generate import main
from falqon_jax.model.generation import generate, sample_logits

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
LLAMA_TOKENIZER = SHARED / "tokenizers" / "llama"
SMOL = SHARED / "models" / "smollm2-135m-instruct"  # its tokenizer and chat template
NEW = 40  # greedy tokens compared with transformers
BATCH_NEW = 12  # tokens generated for the batched prompts (one compiled program)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not present")


def highest():
    """float32 GEMMs on every backend (no TF32), for exact comparisons."""
    return jax.default_matmul_precision("highest")


@pytest.fixture(scope="module")
def model():
    return load_model(STORIES, dtype="float32")


@pytest.fixture(scope="module")
def hf_model():
    return transformers.LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def greedy(model):
    """Greedy continuation of BOS, ``NEW`` tokens (EOS = 2 does not occur in them)."""
    with highest():
        return generate(model.module, model.params, [[1]], NEW, eos_id=2)[0]


@pytest.fixture(scope="module")
def prompts(greedy):
    """Three prompts of different lengths (left-padded to 7 tokens in one batch)."""
    return [[1], [1] + greedy[:6], [1] + greedy[:2]]


@needs_stories
def test_greedy_matches_transformers_generate(greedy, hf_model):
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=NEW,
                                min_new_tokens=NEW)
    assert len(greedy) == NEW
    assert greedy == ref[0, 1:].tolist()


@needs_stories
def test_kv_cache_decode_matches_full_forward(model, greedy, prompts):
    """A left-padded batch decoded with the cache gives, at every step, the argmax of the
    full (cache-free) forward over prompt + generated tokens, and padding changes nothing."""
    new = BATCH_NEW
    with highest():
        outs = generate(model.module, model.params, prompts, new)
    width = max(len(p) for p in prompts) + new
    sequences = np.zeros((len(prompts), width), np.int32)  # right-padded, one forward
    mask = np.zeros_like(sequences)
    for row, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        assert out == greedy[len(prompt) - 1 : len(prompt) - 1 + new]
        sequences[row, : len(prompt) + new] = prompt + out
        mask[row, : len(prompt) + new] = 1
    with highest():
        logits = np.asarray(model.logits(sequences, mask))
    for row, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        predicted = logits[row, len(prompt) - 1 : len(prompt) - 1 + new].argmax(axis=-1)
        assert predicted.tolist() == out


@needs_stories
def test_eos_cuts_the_continuation(model, greedy, prompts):
    eos = greedy[8]  # the first prompt reaches it, the others (further along) may not
    with highest():
        outs = generate(model.module, model.params, prompts, BATCH_NEW, eos_id=[eos, 9999])
    for prompt, out in zip(prompts, outs, strict=True):
        full = greedy[len(prompt) - 1 : len(prompt) - 1 + BATCH_NEW]
        cut = full[: full.index(eos) + 1] if eos in full else full
        assert out == cut
    assert outs[0][-1] == eos


@needs_stories
def test_sampling_is_reproducible_per_seed(model, prompts):
    def sample(seed: int) -> list[list[int]]:
        with highest():  # the program the greedy tests compiled: settings are traced
            return generate(model.module, model.params, prompts, BATCH_NEW, temperature=1.0,
                            top_p=0.9, seed=seed)

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_sample_logits_nucleus_and_temperature():
    probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04], np.float32)
    logits = jnp.asarray(np.log(probs))[None]

    @jax.jit
    def draw(keys: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
        """Traced settings: one compiled program for every case below."""
        return jax.vmap(lambda k: sample_logits(logits, k, temperature, top_p)[0])(keys)

    keys = jax.random.split(jax.random.key(0), 4000)
    one = jnp.float32(1.0)
    for top_p, nucleus in [(0.45, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, set(range(5)))]:
        tokens = np.asarray(draw(keys, one, jnp.float32(top_p)))
        assert set(tokens.tolist()) == nucleus, top_p
        kept = probs[sorted(nucleus)] / probs[sorted(nucleus)].sum()
        freq = np.bincount(tokens, minlength=5)[sorted(nucleus)] / len(tokens)
        np.testing.assert_allclose(freq, kept, atol=0.03)
    # Temperature 0 is the argmax; a cold temperature concentrates on it too.
    assert not np.asarray(draw(keys, jnp.float32(0.0), jnp.float32(0.5))).any()
    assert not np.asarray(draw(keys, jnp.float32(0.05), one)).any()
    # The static path (Python floats) draws the same tokens as the traced one.
    eager = [int(sample_logits(logits, k, 1.0, 0.7)[0]) for k in keys[:8]]
    assert eager == np.asarray(draw(keys, one, jnp.float32(0.7)))[:8].tolist()
    assert int(sample_logits(logits, keys[0], 0.0, 0.1)[0]) == 0


@needs_stories
def test_generate_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model.module, model.params, [[]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model.module, model.params, [[1]], 0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model.module, model.params, [[1]], 4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model.module, model.params, [[1]], 4, temperature=1.0, top_p=0.0)


# --------------------------------------------------------------------------------------
# Command line.


@needs_stories
def test_cli_prompt_ids_greedy(greedy, capsys):
    with highest():
        code = main(["--model", str(STORIES), "--prompt-ids", "1", "--max-new-tokens",
                     str(NEW), "--dtype", "float32", "--ignore-eos"])
    assert code == 0
    assert capsys.readouterr().out.strip() == ",".join(map(str, greedy))


@pytest.mark.skipif(not LLAMA_TOKENIZER.is_dir(), reason="LLaMA tokenizer not present")
def test_cli_text_prompt_matches_transformers(tmp_path, capsys):
    """A random LLaMA with the 32k LLaMA vocabulary: text in, text out, as transformers."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.5, bos_token_id=1, eos_token_id=2,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "m")
    tok = transformers.AutoTokenizer.from_pretrained(LLAMA_TOKENIZER)
    prompt = "Once upon a time"
    ids = tok.encode(prompt)  # what the tokenizer makes of it, its own specials (if any) in
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8,
                          min_new_tokens=8)[0, len(ids):].tolist()
    with highest():
        code = main(["--model", str(tmp_path / "m"), "--tokenizer", str(LLAMA_TOKENIZER),
                     "--prompt", prompt, "--max-new-tokens", "8", "--dtype", "float32",
                     "--ignore-eos"])
    assert code == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(ref, skip_special_tokens=True)


@needs_stories
@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/run", "--prompt-ids", "1"], "does not exist"),
        (["--model", str(STORIES), "--prompt", "hi"], "no known tokenizer"),
        (["--model", str(STORIES), "--prompt-ids", "1,x"], "comma-separated integers"),
        (["--model", str(STORIES), "--prompt-ids", "1,600"], "must be in 0..511"),
        (["--model", str(STORIES), "--prompt-ids", "1", "--top-p", "0"], "--top-p"),
        (["--model", str(STORIES), "--prompt-ids", "1", "--max-new-tokens", "0"], "--max"),
        (["--model", "tiny", "--prompt-ids", "1"], "--init random"),
        (["--model", "no-such-card", "--prompt-ids", "1"], "no such directory, model card"),
        (["--model", str(STORIES), "--prompt-ids", "1", "--chat"], "does not take --prompt-ids"),
        (["--model", str(STORIES), "--prompt", "hi", "--system", "x"], "--system needs --chat"),
        (["--model", str(STORIES), "--prompt", "hi", "--chat", "--tokenizer",
          str(LLAMA_TOKENIZER)], "--chat: the tokenizer has no chat template"),
        (["--model", str(STORIES), "--prompt", "hi", "--tokenizer", "/no/such/tokenizer"],
         "--tokenizer /no/such/tokenizer: tokenizer /no/such/tokenizer is not a directory"),
        (["--model", str(STORIES)], "one of the arguments --prompt --prompt-ids"),
        (["--model", str(STORIES), "--prompt-ids", "1", "--dtype", "fp4"], "invalid choice"),
    ],
)
def test_cli_mistakes_are_one_line(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.skipif(not SMOL.is_dir(), reason=f"{SMOL} not present")
def test_chat_prompts_are_the_templates_and_generate_as_transformers(tmp_path, capsys):
    """``--chat``: the prompt becomes exactly the ids of transformers' own
    ``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``, and a random
    LLaMA with SmolLM2's vocabulary continues them as transformers' ``generate`` does."""
    from falqon_jax.generate import encode_chat

    tok = transformers.AutoTokenizer.from_pretrained(SMOL)
    prompt, system = "Name a colour.", "Answer in one word."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert encode_chat(tok, prompt, system) == ids
    assert encode_chat(tok, prompt) == tok.apply_chat_template(
        messages[1:], add_generation_prompt=True)["input_ids"]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        initializer_range=0.5, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=6,
                          min_new_tokens=6)[0, len(ids):].tolist()
    with highest():
        code = main(["--model", str(tmp_path / "m"), "--tokenizer", str(SMOL), "--chat",
                     "--system", system, "--prompt", prompt, "--max-new-tokens", "6",
                     "--dtype", "float32", "--ignore-eos"])
    assert code == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(ref, skip_special_tokens=True)


@needs_stories
def test_models_by_hub_name_and_by_card(fake_hub, greedy, capsys, tmp_path, monkeypatch):
    """``--model org/name`` (and a card naming it as its source) generates what the local
    directory does."""
    fake_hub.add("karpathy/stories260K", {p.name: p for p in STORIES.iterdir()})
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "stories.toml").write_text('source = "karpathy/stories260K"\n')
    monkeypatch.setenv("FALQON_MODELS_DIR", str(cards))
    for name in ("karpathy/stories260K", "stories"):
        with highest():
            code = main(["--model", name, "--prompt-ids", "1", "--max-new-tokens", str(NEW),
                         "--dtype", "float32", "--ignore-eos"])
        assert code == 0
        assert capsys.readouterr().out.strip() == ",".join(map(str, greedy))
