"""Export (Hugging Face and FP8 layouts), reading FP8 exports back, and loading training runs."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from falqon_jax import export, fp8, load_model, melded, methods
from falqon_jax.llama import ALL_TARGETS
from falqon_jax.run_loading import LoadError, _restore_all, load_run, run_module

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
TOL = 1e-4  # float32 logits, ours against transformers (as in test_llama)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not present")


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|."""
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def bits(x) -> np.ndarray:
    """The raw bytes of an array (for bit-exact comparisons of FP8 and float data)."""
    return np.ascontiguousarray(np.asarray(x)).view(np.uint8)


def safetensors_header(path: Path) -> dict:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + size])


@pytest.fixture(scope="module")
def tokens():
    tokens = np.random.default_rng(0).integers(3, 512, size=(2, 24))
    tokens[:, 0] = 1
    return tokens


@pytest.fixture(scope="module")
def full():
    return load_model(STORIES, dtype="float32")


def perturb(params, seed: int = 1):
    """Rewrite ~1/8 of the backbone rows of every melded layer, as FALQON's merges do."""
    rng = np.random.default_rng(seed)

    def one(p):
        if not isinstance(p, melded.MeldedLinear):
            return p
        w = np.asarray(p.w8).astype(np.float32)
        rows = rng.choice(p.out, size=max(1, p.out // 8), replace=False)
        w[..., rows, :] += rng.normal(scale=4.0, size=w[..., rows, :].shape)
        w8 = np.clip(w, -448, 448).astype(ml_dtypes.float8_e4m3fn)
        return dataclasses.replace(p, w8=jnp.asarray(w8))

    return jax.tree.map(one, params, is_leaf=melded.is_melded)


@pytest.fixture(scope="module")
def falqon():
    """FALQON on every layer that allows it (the MLP, 172 wide, stays dense), lm_head
    included; backbone rows perturbed to look trained."""
    with pytest.warns(UserWarning, match="unconverted"):
        model = load_model(STORIES, method="falqon", rank=16, dtype="float32",
                           targets=ALL_TARGETS)
    model.original_params = model.params
    model.params = perturb(model.params)
    return model


def melded_leaves(params) -> list[melded.MeldedLinear]:
    return [x for x in jax.tree.leaves(params, is_leaf=melded.is_melded) if melded.is_melded(x)]


def hf_logits(directory: Path, tokens: np.ndarray, dtype=None) -> np.ndarray:
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        directory, dtype=dtype or torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(torch.tensor(tokens)).logits.float().numpy()


# --------------------------------------------------------------------------------------
# Hugging Face format.


def test_hf_export_of_full_model_matches_transformers(full, tokens, tmp_path):
    out = export.export_model(full, tmp_path / "hf", dtype="float32")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["dtype"] == "float32"
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(full.logits(tokens))
    assert rel_err(hf_logits(out, tokens), ours) < TOL


def test_hf_export_of_falqon_writes_dequantized_weights(falqon, tokens, tmp_path):
    """Effective weights are ``DQ(w8[:out])`` exactly; transformers on the export equals our
    forward over the same dense weights (our FALQON forward also quantizes activations to
    FP8, which a dense checkpoint cannot express: that difference is reported, not bounded)."""
    out = export.export_model(falqon, tmp_path / "hf", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # lm_head is its own (FP8-trained) matrix
    q = falqon.params["layers"]["self_attn"]["q_proj"]
    from safetensors.numpy import load_file

    saved = load_file(out / "model.safetensors")
    for i in range(falqon.config.num_layers):
        want = np.asarray(melded.dequantize(jax.tree.map(lambda x, i=i: x[i], q)))
        np.testing.assert_array_equal(saved[f"model.layers.{i}.self_attn.q_proj.weight"], want)
    np.testing.assert_array_equal(saved["lm_head.weight"],
                                  np.asarray(melded.dequantize(falqon.params["lm_head"])))
    dense = load_model(out, dtype="float32")  # our loader, plain dense layers
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(dense.logits(tokens))
    assert rel_err(hf_logits(out, tokens), ours) < TOL


def test_hf_export_bfloat16_is_the_rounded_effective_weight(falqon, tmp_path):
    out = export.export_model(falqon, tmp_path / "hf16")
    header = safetensors_header(out / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    from safetensors.numpy import load_file

    saved = load_file(out / "model.safetensors")
    k = jax.tree.map(lambda x: x[2], falqon.params["layers"]["self_attn"]["k_proj"])
    want = np.asarray(melded.dequantize(k)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(bits(saved["model.layers.2.self_attn.k_proj.weight"]),
                                  bits(want))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("name", ["lora", "qlora", "fp8_lora"])
def test_effective_weight_of_adapter_methods(name):
    """``W + (alpha / rank) B A`` (``W`` dequantized) reproduces the layer's own output."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 128)).astype(np.float32) * 0.05
    method = methods.get(name)
    layer = method.init(jnp.asarray(w), 8, alpha=16.0, key=jax.random.key(0),
                        dtype=jnp.float32)
    layer = dataclasses.replace(layer, b=jnp.asarray(rng.normal(size=(64, 8)), jnp.float32))
    effective = export.effective_weight(layer)
    x = rng.normal(size=(5, 128)).astype(np.float32)
    if name == "fp8_lora":  # its forward quantizes x as well: compare with the formula
        base = np.asarray(fp8.dequantize(layer.w8, layer.scale))
        want = base + 2.0 * np.asarray(layer.b) @ np.asarray(layer.a)
        np.testing.assert_allclose(effective, want, rtol=1e-6, atol=1e-6)
    else:
        with jax.default_matmul_precision("highest"):
            y = np.asarray(method.apply(layer, jnp.asarray(x)))
        np.testing.assert_allclose(x @ effective.T, y, rtol=1e-4, atol=1e-5)
    assert np.abs(effective - w).max() > 0.1  # the adapter is really in there


def test_falqon_with_nonzero_b_is_refused():
    b = np.zeros((32, 4), np.float32)
    b[3, 1] = 1.0
    broken = melded.MeldedLinear(w8=jnp.zeros((36, 32), fp8.E4M3), scale=jnp.float32(1),
                                 b=jnp.asarray(b), out=32, rank=4)
    with pytest.raises(export.ExportError, match="non-zero b"):
        export.effective_weight(broken)


# --------------------------------------------------------------------------------------
# FP8 format.


def test_fp8_export_layout(falqon, tmp_path):
    out = export.export_model(falqon, tmp_path / "fp8", format="fp8")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "falqon_extras.safetensors", "model.safetensors",
                     "model.safetensors.index.json"]
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    assert quant["format"] == "float-quantized"
    group = quant["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert (group["weights"]["type"], group["weights"]["num_bits"],
            group["weights"]["strategy"], group["weights"]["dynamic"]) == ("float", 8, "tensor",
                                                                           False)
    assert (group["input_activations"]["strategy"],
            group["input_activations"]["dynamic"]) == ("tensor", True)
    assert "lm_head" in quant["ignore"] and "model.layers.0.mlp.up_proj" in quant["ignore"]
    assert "model.layers.0.self_attn.q_proj" not in quant["ignore"]
    main = safetensors_header(out / "model.safetensors")
    assert main["model.layers.3.self_attn.o_proj.weight"]["dtype"] == "F8_E4M3"
    assert main["model.layers.3.self_attn.o_proj.weight"]["shape"] == [64, 64]
    scale = main["model.layers.3.self_attn.o_proj.weight_scale"]
    assert (scale["dtype"], scale["shape"]) == ("F32", [1])
    assert not any(k.endswith("input_scale") or "falqon" in k for k in main)
    assert main["lm_head.weight"]["dtype"] == "BF16"  # serving stacks keep lm_head dense
    assert main["model.layers.0.mlp.up_proj.weight"]["dtype"] == "BF16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert set(index["weight_map"]) == set(main) - {"__metadata__"}
    extras = safetensors_header(out / "falqon_extras.safetensors")
    assert extras["model.layers.0.self_attn.k_proj.falqon_a"]["shape"] == [16, 64]
    assert extras["lm_head.weight"]["dtype"] == "F8_E4M3"


def test_fp8_export_round_trips_bit_exactly(falqon, tokens, tmp_path):
    export.export_model(falqon, tmp_path / "fp8", format="fp8", dtype="float32")
    back = export.load_fp8_export(tmp_path / "fp8", dtype="float32")
    assert back.plan == falqon.plan
    assert jax.tree.structure(back.params) == jax.tree.structure(falqon.params)
    for got, want in zip(melded_leaves(back.params), melded_leaves(falqon.params), strict=True):
        np.testing.assert_array_equal(bits(got.w8), bits(want.w8))
        np.testing.assert_array_equal(bits(got.scale), bits(want.scale))
        assert not np.asarray(got.b).any()
    for got, want in zip(jax.tree.leaves(back.params), jax.tree.leaves(falqon.params),
                         strict=True):
        np.testing.assert_array_equal(bits(got), bits(want))
    np.testing.assert_array_equal(np.asarray(back.logits(tokens)),
                                  np.asarray(falqon.logits(tokens)))


def test_load_model_refuses_an_fp8_export(falqon, tmp_path):
    """Reading the raw FP8 tensors as plain weights would give a wrong model silently."""
    from falqon_jax import load_model

    export.export_model(falqon, tmp_path / "fp8", format="fp8")
    with pytest.raises(ValueError, match="quantized weights .compressed-tensors.*load_fp8_export"):
        load_model(tmp_path / "fp8")


def test_fp8_export_bfloat16_keeps_fp8_bits(falqon, tokens, tmp_path):
    """The default bf16 export rounds only the non-FP8 tensors; the FP8 weights stay exact."""
    export.export_model(falqon, tmp_path / "fp8", format="fp8")
    back = export.load_fp8_export(tmp_path / "fp8", dtype="float32")
    for got, want in zip(melded_leaves(back.params), melded_leaves(falqon.params), strict=True):
        np.testing.assert_array_equal(bits(got.w8), bits(want.w8))
        np.testing.assert_array_equal(bits(got.scale), bits(want.scale))
    embed = np.asarray(falqon.params["embed_tokens"]).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(back.params["embed_tokens"]), embed)


def test_fp8_export_without_a_rows(falqon, tmp_path):
    """Without ``falqon_a`` the FP8 layers come back as fp8_lora layers (fresh adapter, b = 0)
    holding the same FP8 weight."""
    from falqon_jax.fp8_lora import Fp8LoraLinear

    export.export_model(falqon, tmp_path / "fp8", format="fp8", falqon_a=False)
    assert not (tmp_path / "fp8" / "falqon_extras.safetensors").exists() or \
        "falqon_a" not in str(safetensors_header(tmp_path / "fp8" / "falqon_extras.safetensors"))
    back = export.load_fp8_export(tmp_path / "fp8", dtype="float32")
    assert back.plan.q == "fp8_lora" and back.plan.lm_head == "fp8_lora"
    assert back.plan.up == "frozen"
    q = back.params["layers"]["self_attn"]["q_proj"]
    assert isinstance(q, Fp8LoraLinear) and not np.asarray(q.b).any()
    want = falqon.params["layers"]["self_attn"]["q_proj"]
    np.testing.assert_array_equal(bits(q.w8), bits(want.w8[:, : want.out]))
    np.testing.assert_array_equal(bits(q.scale), bits(want.scale))


def test_fp8_export_of_dense_model_quantizes_aligned_projections(full, tmp_path):
    export.export_model(full, tmp_path / "fp8", format="fp8", dtype="float32")
    assert not (tmp_path / "fp8" / "falqon_extras.safetensors").exists()
    back = export.load_fp8_export(tmp_path / "fp8", dtype="float32")
    assert (back.plan.q, back.plan.o, back.plan.gate, back.plan.lm_head) == (
        "fp8_lora", "fp8_lora", "frozen", "frozen")
    v8 = jax.tree.map(lambda x: x[1], back.params["layers"]["self_attn"]["v_proj"])
    w = np.asarray(full.params["layers"]["self_attn"]["v_proj"].w[1])
    q, scale = fp8.quantize(jnp.asarray(w), fp8.E4M3)
    np.testing.assert_array_equal(bits(v8.w8), bits(q))
    assert float(v8.scale) == float(scale) == pytest.approx(np.abs(w).max() / 448)


# --------------------------------------------------------------------------------------
# Training runs.


@pytest.fixture(scope="module")
def run(falqon, tmp_path_factory):
    """A FALQON run on stories260K with checkpoints at step 5 (the converted model) and at
    step 10 (perturbed params), saved as the training loop saves them."""
    from falqon_jax.checkpoints import CheckpointStore
    from falqon_jax.train_config import TrainConfig
    from falqon_jax.trainer import Trainer

    out = tmp_path_factory.mktemp("run")
    config = dataclasses.replace(
        TrainConfig(), model=str(STORIES), data="train.json", method="falqon", rank=16,
        targets=ALL_TARGETS, dtype="float32", out=str(out), remat=False,
    )
    (out / "config.json").write_text(config.to_json() + "\n")

    def forward(params, tokens, attention):
        return falqon.module.apply({"params": params}, tokens, attention)

    trainer = Trainer(config, forward, falqon.trainable())
    store = CheckpointStore(out, keep=3)
    for step, params in [(5, falqon.original_params), (10, falqon.params)]:
        state = trainer.init_state(params)._replace(step=jnp.asarray(step, jnp.int32))
        store.save(step, state, {"step": step})
    store.close()
    return out


def assert_same_params(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(bits(a), bits(b))


def test_load_run_restores_the_latest_or_a_given_checkpoint(run, falqon):
    model, config = load_run(run)
    assert config.method == "falqon" and config.rank == 16
    assert model.module == falqon.module
    assert_same_params(model.params, falqon.params)
    earlier, _ = load_run(run / "checkpoints" / "5")
    assert_same_params(earlier.params, falqon.original_params)
    latest, _ = load_run(run / "checkpoints")  # the folder stands for the run
    assert_same_params(latest.params, falqon.params)


def test_restore_fallback_reads_the_whole_state(run, falqon):
    """The path for Orbax versions without partial restores."""
    import orbax.checkpoint as ocp

    from falqon_jax.llama import abstract_params
    from falqon_jax.run_loading import read_run_config

    module = run_module(read_run_config(run))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = _restore_all(ocp, (run / "checkpoints" / "10" / "state").resolve(),
                          abstract_params(module), device)
    assert_same_params(params, falqon.params)


def test_export_from_a_run(run, falqon, tmp_path, capsys):
    from falqon_jax.generate import main as generate_main

    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "fp8"),
                        "--format", "fp8", "--dtype", "float32"]) == 0
    assert "training run" in capsys.readouterr().out
    back = export.load_fp8_export(tmp_path / "fp8", dtype="float32")
    for got, want in zip(melded_leaves(back.params), melded_leaves(falqon.params), strict=True):
        np.testing.assert_array_equal(bits(got.w8), bits(want.w8))
    # The generate CLI loads runs the same way; this run names no tokenizer.
    assert generate_main(["--model", str(run), "--prompt", "hello"]) == 2
    assert "no known tokenizer" in capsys.readouterr().err


def test_load_run_errors(run, tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(LoadError, match="is a model checkpoint"):
        load_run(STORIES)
    with pytest.raises(LoadError, match="neither"):
        load_run(tmp_path)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.json").write_text((run / "config.json").read_text())
    with pytest.raises(LoadError, match="without checkpoints"):
        load_run(empty)
    import shutil

    other = tmp_path / "other_settings"
    shutil.copytree(run, other)
    settings = json.loads((other / "config.json").read_text())
    for key, value, missing in [("rank", 8, "not compatible"), ("method", "lora", "lacks")]:
        (other / "config.json").write_text(json.dumps({**settings, key: value}))
        with pytest.raises(LoadError, match=f"does not fit the run's model.*{missing}"):
            load_run(other)


# --------------------------------------------------------------------------------------
# Command line.


def run_cli(args: list[str]) -> int:
    try:
        return export.main(args)
    except SystemExit as exit_:  # argparse errors
        return int(exit_.code)


def test_cli_hf_export_copies_the_tokenizer(tmp_path, capsys):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    assert run_cli(["--checkpoint", str(STORIES), "--out", str(out), "--tokenizer",
                    str(tok)]) == 0
    assert (out / "tokenizer.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
    assert "Hugging Face checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, message",
    [
        ("format", "invalid choice: 'gguf'"),
        ("missing", "does not exist"),
        ("nonempty", "not empty"),
        ("file", "is a file"),
        ("neither", "not a training run"),
    ],
)
def test_cli_mistakes_are_one_line_and_overwrite_nothing(case, message, tmp_path, capsys):
    out = tmp_path / "out"
    source = str(STORIES)
    extra: list[str] = []
    if case == "format":
        extra = ["--format", "gguf"]
    elif case == "missing":
        source = str(tmp_path / "no" / "such" / "run")
    elif case == "nonempty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "file":
        out.write_text("mine")
    elif case == "neither":
        source = str(tmp_path / "plain")
        Path(source).mkdir()
    code = run_cli(["--checkpoint", source, "--out", str(out), *extra])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    if case == "nonempty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    elif case == "file":
        assert out.read_text() == "mine"
    else:
        assert not out.exists()
