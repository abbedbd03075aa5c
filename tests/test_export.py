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

from falqon_jax import export, fp8, load_model, melded
from falqon_jax.export import cli as export_cli
from falqon_jax.export import reader as export_reader
from falqon_jax.model import methods
from falqon_jax.model.llama import ALL_TARGETS
from falqon_jax.model.loading import LoadError
from falqon_jax.train.runs import load_run
from tests.helpers import rel_err

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
TOL = 1e-4  # float32 logits, ours against transformers (as in test_llama)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not present")


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


def with_random_b(params, seed: int = 2, sigma: float = 0.003):
    """Every melded layer's ``b`` replaced by N(0, sigma) float32 values (a trained live
    adapter; sigma moves the dense stories260K logits by about 16%)."""
    rng = np.random.default_rng(seed)

    def one(p):
        if not isinstance(p, melded.MeldedLinear):
            return p
        return dataclasses.replace(p, b=jnp.asarray(rng.normal(scale=sigma, size=p.b.shape),
                                                    jnp.float32))

    return jax.tree.map(one, params, is_leaf=melded.is_melded)


@pytest.fixture(scope="module")
def falqon_b(falqon):
    """The ``falqon`` fixture with a non-zero live ``b`` on every melded layer."""
    from falqon_jax.model.llama import LlamaModel

    assert all(p.b_in_forward for p in melded_leaves(falqon.params))
    return LlamaModel(falqon.module, with_random_b(falqon.params))


@pytest.fixture(scope="module")
def falqon_b_hf(falqon_b, tmp_path_factory):
    """The float32 ``hf`` export of ``falqon_b``."""
    return export.export_model(falqon_b, tmp_path_factory.mktemp("b") / "hf", dtype="float32")


@pytest.fixture(scope="module")
def falqon_b_fp8(falqon_b, tmp_path_factory):
    """The float32 ``fp8`` export of ``falqon_b`` (FP8 base + PEFT adapter)."""
    return export.export_model(falqon_b, tmp_path_factory.mktemp("b") / "fp8", format="fp8",
                               dtype="float32")


def dense_logits(directory: Path, tokens: np.ndarray) -> np.ndarray:
    """Our float32 logits over the dense weights of an ``hf`` export."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(load_model(directory, dtype="float32").logits(tokens))


def falqon_effective_weight64(p: melded.MeldedLinear) -> np.ndarray:
    """``DQ(w8[:out]) + b DQ(w8[out:])`` of one layer: float32 DQ, float64 sum, float32."""
    w = np.asarray(p.w8).astype(np.float32) * np.float32(p.scale)
    base, a = w[: p.out].astype(np.float64), w[p.out :].astype(np.float64)
    return (base + np.asarray(p.b, np.float64) @ a).astype(np.float32)


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


@pytest.mark.parametrize("live", [True, False])
def test_falqon_b_in_the_effective_weight(live):
    """A live ``b`` is part of the weight; a proxy-rule layer (``b_in_forward=False``) never
    adds it, so a non-zero one there is a corrupt state and refused."""
    rng = np.random.default_rng(0)
    w8 = jnp.asarray(rng.normal(size=(36, 32)), fp8.E4M3)
    b = np.zeros((32, 4), np.float32)
    b[3, 1] = 1.0
    layer = melded.MeldedLinear(w8=w8, scale=jnp.float32(0.5), b=jnp.asarray(b), out=32,
                                rank=4, b_in_forward=live)
    if not live:
        with pytest.raises(export.ExportError, match="non-zero b"):
            export.effective_weight(layer)
        return
    with jax.default_matmul_precision("highest"):
        want = np.asarray(melded.effective_weight(layer))
    np.testing.assert_array_equal(export.effective_weight(layer), want)
    assert np.abs(want - np.asarray(melded.dequantize(layer))).max() > 0.1


def test_hf_export_of_falqon_with_live_b(falqon, falqon_b, falqon_b_hf, tokens, tmp_path):
    """With a non-zero ``b`` the exported weight is ``DQ(w8[:out]) + b A`` (float64 sum,
    rounded once) and transformers on the export matches our dense forward over the same
    weights to the float32 tolerance; without ``b`` the logits would be far off."""
    from safetensors.numpy import load_file

    saved = load_file(falqon_b_hf / "model.safetensors")
    v = falqon_b.params["layers"]["self_attn"]["v_proj"]
    for i in range(falqon_b.config.num_layers):
        layer = jax.tree.map(lambda x, i=i: x[i], v)
        np.testing.assert_array_equal(saved[f"model.layers.{i}.self_attn.v_proj.weight"],
                                      falqon_effective_weight64(layer))
    np.testing.assert_array_equal(saved["lm_head.weight"],
                                  falqon_effective_weight64(falqon_b.params["lm_head"]))
    theirs = hf_logits(falqon_b_hf, tokens)
    assert rel_err(theirs, dense_logits(falqon_b_hf, tokens)) < TOL
    without_b = export.export_model(falqon, tmp_path / "hf0", dtype="float32")
    assert rel_err(theirs, dense_logits(without_b, tokens)) > 100 * TOL


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
    from falqon_jax.baselines.fp8_lora import Fp8LoraLinear

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


def test_fp8_export_with_live_b_writes_a_peft_adapter(falqon_b, falqon_b_fp8):
    out = falqon_b_fp8
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "config.json",
        "falqon_extras.safetensors", "model.safetensors", "model.safetensors.index.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"],
            config["bias"], config["lora_dropout"]) == ("LORA", "CAUSAL_LM", 16, 16, "none", 0)
    assert config["target_modules"] == ["k_proj", "lm_head", "o_proj", "q_proj", "v_proj"]
    header = safetensors_header(out / "adapter_model.safetensors")
    a = header["base_model.model.model.layers.4.self_attn.o_proj.lora_A.weight"]
    b = header["base_model.model.model.layers.4.self_attn.o_proj.lora_B.weight"]
    assert (a["dtype"], a["shape"], b["dtype"], b["shape"]) == ("F32", [16, 64], "F32", [64, 16])
    assert "base_model.model.lm_head.lora_B.weight" in header
    assert not any("mlp" in k for k in header)  # the MLP stays dense, without an adapter
    meta = json.loads((out / "config.json").read_text())["falqon_jax"]
    assert meta["adapter"] == "adapter_model.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    # The FP8 base is w8[:out] as it is, whatever b.
    q = falqon_b.params["layers"]["self_attn"]["q_proj"]
    saved = export_reader._SafeTensors([out / "model.safetensors"])
    np.testing.assert_array_equal(bits(saved.get("model.layers.0.self_attn.q_proj.weight")),
                                  bits(q.w8[0, : q.out]))


def torch_fp8_base(directory: Path):
    """transformers' LlamaForCausalLM (float32) with an ``fp8`` export's weights dequantized,
    ``W = weight * weight_scale``; lm_head from the dense copy in model.safetensors."""
    from safetensors.torch import load_file

    raw = json.loads((directory / "config.json").read_text())
    config = transformers.LlamaConfig.from_dict(
        {k: v for k, v in raw.items() if k not in ("quantization_config", "falqon_jax")})
    saved = load_file(directory / "model.safetensors")
    state = {}
    for name, tensor in saved.items():
        if name.endswith(".weight_scale"):
            continue
        scale = saved.get(name.removesuffix(".weight") + ".weight_scale")
        state[name] = tensor.float() * scale if scale is not None else tensor.float()
    model = transformers.LlamaForCausalLM(config).float()
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_peft_loads_the_fp8_adapter(falqon_b_fp8, falqon_b_hf, tokens):
    """PEFT's LoRA on the dequantized FP8 base gives the effective-weight logits. Tolerance:
    both sides are float32; PEFT adds ``(x A^T) B^T`` to ``x W^T`` where our dense model
    multiplies by ``W + B A`` rounded once, so they differ by float32 rounding only (about
    1e-6 relative), well inside the float32 tolerance TOL used against transformers."""
    peft = pytest.importorskip("peft")
    model = peft.PeftModel.from_pretrained(torch_fp8_base(falqon_b_fp8), falqon_b_fp8)
    with torch.no_grad():
        theirs = model.eval()(torch.tensor(tokens)).logits.float().numpy()
    assert rel_err(theirs, dense_logits(falqon_b_hf, tokens)) < TOL


@pytest.mark.parametrize("falqon_a", [True, False])
def test_fp8_export_with_live_b_round_trips_bit_exactly(falqon_b, falqon_b_fp8, falqon_a,
                                                        tokens, tmp_path):
    """``b`` comes back from the adapter bit for bit, as live adapters; without
    ``falqon_a`` the A rows are recovered exactly from the adapter's ``lora_A``."""
    out = falqon_b_fp8
    if not falqon_a:
        out = export.export_model(falqon_b, tmp_path / "fp8", format="fp8", dtype="float32",
                                  falqon_a=False)
        assert "falqon_a" not in str(safetensors_header(out / "falqon_extras.safetensors"))
    back = export.load_fp8_export(out, dtype="float32")
    assert back.plan == falqon_b.plan
    got = melded_leaves(back.params)
    assert all(p.b_in_forward for p in got) and all(np.asarray(p.b).any() for p in got)
    assert_same_params(back.params, falqon_b.params)
    np.testing.assert_array_equal(np.asarray(back.logits(tokens)),
                                  np.asarray(falqon_b.logits(tokens)))


def test_hf_export_of_an_fp8_export_keeps_b(falqon_b_fp8, falqon_b_hf, tmp_path):
    """Re-exporting the FP8 export (adapter included) as ``hf`` gives the same weights as
    exporting the model directly."""
    from safetensors.numpy import load_file

    assert export_cli.main(["--checkpoint", str(falqon_b_fp8), "--out", str(tmp_path / "hf"),
                        "--dtype", "float32"]) == 0
    got, want = (load_file(d / "model.safetensors") for d in (tmp_path / "hf", falqon_b_hf))
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(bits(got[name]), bits(want[name]))


@pytest.mark.parametrize(
    "case, message",
    [
        ("alpha", "lora_alpha .32. must equal r .16."),
        ("dora", "use_dora is set"),
        ("lora_a", "not the layer's FALQON A rows"),
        ("stray", "belongs to no FP8 layer"),
        ("unquantized", "up_proj, an unquantized layer"),
        ("missing", "no adapter_model.safetensors"),
    ],
)
def test_foreign_adapters_are_refused(falqon_b_fp8, case, message, tmp_path):
    """Only adapters as export writes them can become FALQON's ``b``; anything else would
    be loaded wrongly, so it is refused."""
    import shutil

    from safetensors.numpy import load_file, save_file

    out = tmp_path / "fp8"
    shutil.copytree(falqon_b_fp8, out)
    config_path, tensors_path = out / "adapter_config.json", out / "adapter_model.safetensors"
    config = json.loads(config_path.read_text())
    tensors = load_file(tensors_path)
    if case == "alpha":
        config["lora_alpha"] = 32
    elif case == "dora":
        config["use_dora"] = True
    elif case == "lora_a":
        name = "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"
        tensors[name] = tensors[name] * np.float32(1.5)
    elif case == "stray":
        tensors["base_model.model.model.embed_tokens.lora_A.weight"] = np.zeros(
            (16, 64), np.float32)
    elif case == "unquantized":
        tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = np.zeros(
            (16, 64), np.float32)
    config_path.write_text(json.dumps(config))
    save_file(tensors, str(tensors_path))
    if case == "missing":
        tensors_path.unlink()
    with pytest.raises(LoadError, match=message):
        export.load_fp8_export(out, dtype="float32")


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
    from falqon_jax.train.checkpoints import CheckpointStore
    from falqon_jax.train.config import TrainConfig
    from falqon_jax.train.state_parts import changing_mask
    from falqon_jax.train.trainer import Trainer

    out = tmp_path_factory.mktemp("run")
    config = dataclasses.replace(
        TrainConfig(), model=str(STORIES), data="train.json", method="falqon", rank=16,
        targets=ALL_TARGETS, dtype="float32", out=str(out), remat=False,
    )
    (out / "config.json").write_text(config.to_json() + "\n")

    def forward(params, tokens, attention):
        return falqon.module.apply({"params": params}, tokens, attention)

    trainer = Trainer(config, forward, falqon.trainable())
    states = [trainer.init_state(params)._replace(step=jnp.asarray(step, jnp.int32))
              for step, params in [(5, falqon.original_params), (10, falqon.params)]]
    # The perturbed rows stand for merges, so the FP8 weights are saved with every step.
    changing = changing_mask(states[0], trainer.mask, writes_w8=True)
    store = CheckpointStore(out, 3, changing)
    store.write_frozen(states[0])
    for state in states:
        store.save(int(state.step), state, {"step": int(state.step)})
    store.wait()
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


def test_restore_merges_the_step_with_the_frozen_part(run, falqon):
    """``falqon_jax.restore``: the params as nested dicts of path names, the step's changing
    ones (``b`` and, as saved here, ``w8``) merged with the run's frozen ones (``scale``,
    norms, embeddings), bit for bit."""
    from falqon_jax import restore
    from falqon_jax.train.state_parts import select

    def as_dicts(params):
        return select(params, jax.tree.map(lambda _: True, params))

    for path, step, want in [(run, None, falqon.params), (run, 5, falqon.original_params),
                             (run / "checkpoints" / "10", None, falqon.params)]:
        restored = restore(path, step)
        assert restored.step == (step or 10) and restored.config.rank == 16
        assert_same_params(restored.params, as_dicts(want))
    with pytest.raises(LoadError, match="no checkpoint of step 7 .*steps 5, 10"):
        restore(run, 7)
    with pytest.raises(LoadError, match="checkpoint of step 10, not of step 5"):
        restore(run / "checkpoints" / "10", 5)


def test_export_from_a_run(run, falqon, tmp_path, capsys):
    from falqon_jax.generate import main as generate_main

    assert export_cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "fp8"),
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
        return export_cli.main(args)
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


def test_cli_exports_a_hub_model_as_it_exports_its_directory(fake_hub, tmp_path, capsys):
    fake_hub.add("karpathy/stories260K", {p.name: p for p in STORIES.iterdir()})
    for source, out in [("karpathy/stories260K", tmp_path / "hub"),
                        (str(STORIES), tmp_path / "dir")]:
        assert run_cli(["--checkpoint", source, "--out", str(out), "--format", "fp8",
                        "--method", "falqon", "--rank", "16"]) == 0
    assert "exported Hugging Face Hub model karpathy/stories260K" in capsys.readouterr().out
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "hub" / name).read_bytes() == (tmp_path / "dir" / name).read_bytes()
    assert run_cli(["--checkpoint", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "neither a directory, a Hugging Face Hub name nor a model card with weights" in \
        capsys.readouterr().err


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
