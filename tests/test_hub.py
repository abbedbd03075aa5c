"""Models by Hugging Face Hub name: what is downloaded, where it goes, offline use and the
one-line errors.

The Hub is :mod:`tests.hub_server` on localhost; the client is the real huggingface_hub, so
the cache it writes is the real one, checked with huggingface_hub's own ``scan_cache_dir``.
A cache laid out by hand in the same format (blobs, relative symlinks, ``refs/main``) stands
for one written by another tool or version.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from falqon_jax import hub
from falqon_jax.model.loading import load_model
from falqon_jax.model.resolve import fetch_model, model_directory

SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMA_TOKENIZER = SHARED / "tokenizers" / "llama"
TOKENS = np.array([[1, 5, 9, 200, 3, 7, 100, 2]], np.int32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random LLaMA saved by transformers in shards, with an index."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="60KB")
    assert len(list(path.glob("*.safetensors"))) > 1 and (path / "model.safetensors.index.json"
                                                          ).is_file()
    return path


def repo_files(checkpoint: Path, **extra) -> dict:
    """The checkpoint as a Hub repository also carrying the duplicates real ones have."""
    files = {p.name: p for p in checkpoint.iterdir()}
    files |= {"pytorch_model.bin": b"pickled duplicate", "original/consolidated.00.pth": b"pth",
              "README.md": "# tiny"}
    return files | extra


def logits(model) -> np.ndarray:
    return np.asarray(model.logits(TOKENS))


@pytest.mark.parametrize("text, want", [
    ("huggyllama/llama-7b", ("huggyllama/llama-7b", None)),
    ("meta-llama/Llama-3.1-8B@main", ("meta-llama/Llama-3.1-8B", "main")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("llama-7b", None), ("./org/name", None), ("/abs/path", None), ("a/b/c", None),
    ("org/name@", None), ("org/-bad", None), ("org--x/name", None), ("~/x", None),
])
def test_hub_names(text, want):
    name = hub.parse_name(text)
    assert (name if name is None else (name.repo_id, name.revision)) == want


def test_a_hub_model_downloads_only_what_loading_uses(fake_hub, checkpoint):
    from huggingface_hub import constants, scan_cache_dir

    sha = fake_hub.add("org/tiny", repo_files(checkpoint))
    directory = fetch_model(hub.parse_name("org/tiny"))
    cache = Path(constants.HF_HUB_CACHE)
    assert directory == cache / "models--org--tiny" / "snapshots" / sha
    shards = {p.name for p in checkpoint.glob("*.safetensors")}
    wanted = {"config.json", "generation_config.json", "model.safetensors.index.json", *shards}
    assert fake_hub.downloaded("org/tiny") == wanted  # no .bin, .pth or README
    # huggingface_hub's own view of the cache: one complete revision with exactly those files
    (repo,) = scan_cache_dir(cache).repos
    assert repo.repo_id == "org/tiny" and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.commit_hash == sha and "main" in revision.refs
    assert {f.file_name for f in revision.files} == wanted
    # The downloaded model is the checkpoint: same logits as loading the local directory.
    np.testing.assert_array_equal(logits(load_model("org/tiny", dtype="float32")),
                                  logits(load_model(checkpoint, dtype="float32")))
    # A second load asks the Hub for the listing only, and downloads nothing again.
    before = len(fake_hub.downloaded("org/tiny"))
    fake_hub.requests.clear()
    load_model("org/tiny", init="random")
    assert not [r for r in fake_hub.requests if r[0] == "GET" and "/resolve/" in r[1]]
    assert before == len(wanted)


def test_revisions_pin_a_commit(fake_hub, checkpoint):
    sha = fake_hub.add("org/tiny", repo_files(checkpoint))
    assert model_directory(f"org/tiny@{sha}").name == sha
    with pytest.raises(ValueError, match="has no revision 'v9'") as info:
        model_directory("org/tiny@v9")
    assert "\n" not in str(info.value)


def test_offline_uses_the_cache_alone(fake_hub, checkpoint, monkeypatch):
    from huggingface_hub import constants

    fake_hub.add("org/tiny", repo_files(checkpoint))
    want = logits(load_model("org/tiny", dtype="float32"))
    fake_hub.stop()  # no Hub at all from here on
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    np.testing.assert_array_equal(logits(load_model("org/tiny", dtype="float32")), want)
    with pytest.raises(ValueError, match="org/other is neither a local path nor a model in "
                       "the Hugging Face cache .*HF_HUB_OFFLINE is set"):
        load_model("org/other")


def test_no_network_and_not_cached(fake_hub, checkpoint, monkeypatch):
    from huggingface_hub import constants

    fake_hub.stop()
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ValueError, match=r"org/tiny is neither a local path nor a model in the "
                       r"Hugging Face cache .*the Hub cannot be reached \(ConnectError\): check "
                       "the network connection") as info:
        model_directory("org/tiny")
    assert "\n" not in str(info.value)


def test_an_interrupted_download_is_never_used(fake_hub, checkpoint, monkeypatch):
    """A shard missing from the snapshot (its download stopped before huggingface_hub moved
    it into place) is reported offline and fetched again online."""
    from huggingface_hub import constants

    fake_hub.add("org/tiny", repo_files(checkpoint))
    directory = fetch_model(hub.parse_name("org/tiny"))
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    blob = shard.resolve()
    shard.unlink()
    blob.rename(blob.with_name(blob.name + ".incomplete"))  # as huggingface_hub leaves it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=f"only partly in the Hugging Face cache .*{shard.name}"
                       ".*HF_HUB_OFFLINE is set") as info:
        load_model("org/tiny")
    assert "\n" not in str(info.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    fake_hub.requests.clear()
    assert fetch_model(hub.parse_name("org/tiny")) == directory
    assert fake_hub.downloaded("org/tiny") == {shard.name}
    np.testing.assert_array_equal(logits(load_model("org/tiny", dtype="float32")),
                                  logits(load_model(checkpoint, dtype="float32")))


def test_a_cache_laid_out_by_hand_is_read_offline(fake_hub, checkpoint, monkeypatch):
    """The cache format by hand, without the file listing huggingface_hub keeps beside it:
    ``models--org--name/blobs/<hash>``, ``snapshots/<commit>/<file>`` relative symlinks to
    the blobs, ``refs/main`` holding the commit."""
    from huggingface_hub import constants, scan_cache_dir

    fake_hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = Path(constants.HF_HUB_CACHE)
    repo = cache / "models--someone--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path in checkpoint.iterdir():
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    assert [r.repo_id for r in scan_cache_dir(cache).repos] == ["someone/tiny-llama"]
    np.testing.assert_array_equal(logits(load_model("someone/tiny-llama", dtype="float32")),
                                  logits(load_model(checkpoint, dtype="float32")))
    # One shard gone: refused, not loaded with a hole.
    next(snapshot.glob("model-0000[2-9]*.safetensors")).unlink()
    with pytest.raises(ValueError, match="only partly in the Hugging Face cache"):
        model_directory("someone/tiny-llama")


def test_local_paths_win_over_hub_names(fake_hub, checkpoint, monkeypatch, tmp_path):
    fake_hub.add("org/tiny", repo_files(checkpoint))
    local = tmp_path / "org" / "tiny"
    local.parent.mkdir()
    local.symlink_to(checkpoint)
    monkeypatch.chdir(tmp_path)
    assert model_directory("org/tiny") == Path("org/tiny")
    assert not fake_hub.requests


@pytest.mark.parametrize("case, message", [
    ("missing", "org/nope is neither a local path nor a model on the Hugging Face Hub "
                "(for a private one, log in with `hf auth login` or set HF_TOKEN)"),
    ("gated", "org/gated is a gated model: accept its terms on http://127.0.0.1:"),
    ("gated-bad-token", "your Hugging Face token has no access to the gated model org/gated"),
    ("not-llama", "org/gpt is a 'gpt2' model, not a LLaMA-family checkpoint"),
    ("bin-only", "org/bin has no *.safetensors weights (it holds .bin files); only "
                 "safetensors checkpoints are supported"),
    ("quantized", "org/gptq holds quantized weights (gptq)"),
])
def test_unusable_hub_models_are_one_line_errors(fake_hub, checkpoint, monkeypatch, case,
                                                 message):
    import json

    config = json.loads((checkpoint / "config.json").read_text())
    fake_hub.add("org/gated", repo_files(checkpoint), gated=True)
    fake_hub.add("org/gpt", {"config.json": json.dumps({"model_type": "gpt2"}),
                             "model.safetensors": b"weights"})
    fake_hub.add("org/bin", {"config.json": json.dumps(config), "pytorch_model.bin": b"x"})
    fake_hub.add("org/gptq", {"config.json": json.dumps(
        config | {"quantization_config": {"quant_method": "gptq"}}),
        "model.safetensors": b"weights"})
    if case == "gated-bad-token":
        monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    name = {"missing": "org/nope", "gated-bad-token": "org/gated"}.get(case, f"org/{case}")
    name = {"not-llama": "org/gpt", "bin-only": "org/bin", "quantized": "org/gptq"}.get(case, name)
    with pytest.raises(ValueError) as info:
        load_model(name)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    weights = {f for f in fake_hub.downloaded(name) if f.endswith((".safetensors", ".bin"))}
    assert not weights  # refused before any weights were fetched


def test_gated_models_use_the_users_token(fake_hub, checkpoint, monkeypatch):
    from tests.hub_server import GOOD_TOKEN

    fake_hub.add("org/gated", repo_files(checkpoint), gated=True)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    assert load_model("org/gated", dtype="float32").config.hidden_size == 32


def test_a_card_fine_tunes_its_source(fake_hub, checkpoint, monkeypatch, tmp_path):
    """``load_model(CARD)`` loads the card's ``source`` from the Hub; with ``init="random"``
    the card is an architecture and nothing is downloaded."""
    cards = tmp_path / "cards"
    cards.mkdir()
    arch = ("vocab_size = 256\nhidden_size = 32\nintermediate_size = 64\nnum_layers = 2\n"
            "num_heads = 2\nnum_kv_heads = 2\nhead_dim = 16\n")
    (cards / "mini.toml").write_text(f'source = "org/tiny"\n{arch}')
    (cards / "bare.toml").write_text(arch)
    monkeypatch.setenv("FALQON_MODELS_DIR", str(cards))
    fake_hub.add("org/tiny", repo_files(checkpoint))
    assert load_model("mini", init="random").config.num_layers == 2
    assert not fake_hub.requests
    np.testing.assert_array_equal(logits(load_model("mini", dtype="float32")),
                                  logits(load_model(checkpoint, dtype="float32")))
    with pytest.raises(ValueError, match="'bare' has no weights"):
        load_model("bare")
