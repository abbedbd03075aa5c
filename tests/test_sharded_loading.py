"""Loading onto a mesh (``load_model(..., mesh=)``): every param created already split by the
partition rules, equal bit for bit to the load without a mesh, no device holding more than
its share plus one layer, host memory bounded by one layer whatever the number of layers,
and the trainer taking the params as they are (no second copy).

The 8-device test runs in a subprocess (``--xla_force_host_platform_device_count=8``, as
``tests/test_sharding.py`` does) on a model with LLaMA-70B's structure shrunk 32-fold in
width (hidden 256, MLP 896 = 3.5 x hidden, 8 query heads sharing 1 KV head, as 70B's 64
share 8): the 70B shapes themselves take hours of SVDs per layer on a 2-core CPU
(BENCHMARKS.md, "Loading LLaMA-70B: time and host memory").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from falqon_jax.model import loading
from falqon_jax.model.config import LlamaConfig, load_card
from falqon_jax.sharding import parse_mesh, tree_shardings
from falqon_jax.train.config import DEMO
from falqon_jax.train.prepare import load_model_to_train
from falqon_jax.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and \
        np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def test_the_demo_loads_onto_its_mesh_as_the_trainer_keeps_it_without_a_copy():
    mesh = parse_mesh("")  # every device on fsdp: one CPU device here
    plain = load_model_to_train(DEMO)
    placed = load_model_to_train(DEMO, mesh)
    assert "lm_head" in placed.params  # the demo converts the head too
    assert jax.tree.structure(plain.params) == jax.tree.structure(placed.params)
    assert all(jax.tree.leaves(jax.tree.map(same_bits, plain.params, placed.params)))
    wanted = tree_shardings(mesh, placed.params)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, placed.params,
                                            wanted)))

    def forward(params, tokens, attention):
        return placed.module.apply({"params": params}, tokens, attention)

    state = Trainer(DEMO, forward, placed.trainable(), mesh).init_state(placed.params)
    # the trainer's device_put found every param where it belongs: the same arrays
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a is b, state.params, placed.params)))


def test_a_checkpoint_loads_layer_by_layer_quietly(tmp_path, capfd):
    """``on_layer`` sees each layer once, in order; a small model prints no progress bar."""
    module = loading.load_model("tiny", init="random", method="falqon", rank=16).module
    write_checkpoint(tmp_path, hf_shape(load_card("tiny")), layers=4)
    seen = []
    params = loading.load_params(tmp_path, module, jax.random.key(0), on_layer=seen.append)
    assert seen == [0, 1, 2, 3]
    assert params["layers"]["mlp"]["up_proj"].w8.shape[0] == 4
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_the_progress_bar_is_shown_for_big_models_only():
    assert loading._layer_progress(load_card("tiny")).disable
    # SmolLM2-135M's shapes: 106M values in its layers (its 28M-value vocabulary projection
    # is not converted layer by layer and does not count), converted in seconds.
    smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    assert loading._layer_progress(smollm2).disable
    assert not loading._layer_progress(load_card("llama-7b")).disable


# --------------------------------------------------------------------------------------
# A checkpoint on disk.


def hf_shape(config) -> dict:
    """The Hugging Face config sizes of a :class:`LlamaConfig`."""
    return {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim, "vocab_size": config.vocab_size}


def write_checkpoint(directory: Path, shape: dict, layers: int) -> None:
    """A Hugging Face LLaMA folder of random ``N(0, 0.02)`` bfloat16 weights (random norms
    around 1), one safetensors file per layer and an index, as the Hub's big models are."""
    h, m, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], \
        shape["num_key_value_heads"] * shape["head_dim"]
    rng = np.random.default_rng(0)

    def weights(*dims):
        return (rng.standard_normal(dims, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    def norm():
        return (1 + 0.1 * rng.standard_normal(h, np.float32)).astype(ml_dtypes.bfloat16)

    files = {"model-embed.safetensors": {"model.embed_tokens.weight": weights(v, h),
                                         "lm_head.weight": weights(v, h),
                                         "model.norm.weight": norm()}}
    for i in range(layers):
        p = f"model.layers.{i}."
        files[f"model-{i:03d}.safetensors"] = {
            p + "self_attn.q_proj.weight": weights(q, h), p + "self_attn.k_proj.weight":
            weights(kv, h), p + "self_attn.v_proj.weight": weights(kv, h),
            p + "self_attn.o_proj.weight": weights(h, q), p + "mlp.gate_proj.weight":
            weights(m, h), p + "mlp.up_proj.weight": weights(m, h),
            p + "mlp.down_proj.weight": weights(h, m), p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm()}
    directory.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save_file(tensors, str(directory / name))
    index = {"weight_map": {t: name for name, ts in files.items() for t in ts}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": layers, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": False, **shape}))


# --------------------------------------------------------------------------------------
# On 8 devices: LLaMA-70B's structure, 32 times narrower.

SHRUNK_70B = {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 8,
              "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 2048}
LAYERS = 6

# Loads the checkpoint (argv[1]) onto an 8-device fsdp mesh, then without a mesh, and
# prints one JSON line: per layer, the bytes of live arrays on each device and the process's
# resident memory (now and its peak during that layer), the params' per-device bytes, and
# whether both loads agree bit for bit.
MESH_SCRIPT = r"""
import json, sys
from pathlib import Path
import jax, numpy as np
from falqon_jax.model.config import LlamaConfig
from falqon_jax.model.llama import Llama, plan_linears
from falqon_jax.model.loading import load_params
from falqon_jax.sharding import bytes_per_device, parse_mesh

def memory():
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found

def on_devices():
    totals = {}
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            totals[shard.device.id] = totals.get(shard.device.id, 0) + shard.data.nbytes
    return [totals.get(d.id, 0) for d in jax.devices()]

directory = Path(sys.argv[1])
config = LlamaConfig.from_hf(directory)
module = Llama(config, plan_linears(config, "falqon", rank=16), np.dtype("bfloat16"))
mesh = parse_mesh("fsdp=8")
steps = []

def on_layer(i):
    now = memory()
    steps.append({"layer": i, "devices": on_devices(), "rss": now["VmRSS"],
                  "peak": now["VmHWM"]})
    Path("/proc/self/clear_refs").write_text("5")  # the next peak: that of the next layer

Path("/proc/self/clear_refs").write_text("5")
start = memory()["VmRSS"]
placed = load_params(directory, module, jax.random.key(0), mesh=mesh, on_layer=on_layer)
jax.block_until_ready(placed)
load_peak = memory()["VmHWM"]
shares = bytes_per_device(placed)
plain = load_params(directory, module, jax.random.key(0))
same = jax.tree.map(
    lambda a, b: a.dtype == b.dtype and np.array_equal(
        np.asarray(a).reshape(-1).view(np.uint8), np.asarray(b).reshape(-1).view(np.uint8)),
    placed, plain)
print(json.dumps({
    "steps": steps, "start_rss": start, "load_peak": load_peak,
    "shares": [shares.get(d, 0) for d in jax.devices()],
    "total": sum(leaf.nbytes for leaf in jax.tree.leaves(placed)),
    "sharded": sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(placed)),
    "leaves": len(jax.tree.leaves(placed)),
    "same_bits": all(jax.tree.leaves(same)),
}))
"""


@pytest.fixture(scope="module")
def mesh_load(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shrunk-70b")
    write_checkpoint(directory, SHRUNK_70B, layers=LAYERS)
    # MALLOC_MMAP_THRESHOLD_: every block over 64 KiB its own mapping, returned when freed,
    # so the resident memory follows what is alive (glibc's adaptive threshold would keep
    # freed blocks of a few MiB in its heap, and the resident memory would grow for a while
    # whatever the loader does)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(directory)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_layer_f32_bytes(shape: dict) -> int:
    """The bytes of one decoder layer's seven weight matrices in float32."""
    h, m = shape["hidden_size"], shape["intermediate_size"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], \
        shape["num_key_value_heads"] * shape["head_dim"]
    return 4 * (2 * q * h + 2 * kv * h + 3 * m * h)


@pytest.mark.slow
def test_a_mesh_load_equals_the_plain_one_bit_for_bit(mesh_load):
    assert mesh_load["same_bits"]
    assert [s["layer"] for s in mesh_load["steps"]] == list(range(LAYERS))


@pytest.mark.slow
def test_no_device_holds_more_than_its_share_plus_one_layer(mesh_load):
    layer = one_layer_f32_bytes(SHRUNK_70B)
    shares, total = mesh_load["shares"], mesh_load["total"]
    # the model is split: every big leaf over fsdp, so each device holds about an eighth
    assert max(shares) < total / 4, (shares, total)
    assert mesh_load["sharded"] >= mesh_load["leaves"] // 2
    for step in mesh_load["steps"]:
        for held, share in zip(step["devices"], shares, strict=True):
            assert held <= share + layer, (step["layer"], held, share, layer)


@pytest.mark.slow
def test_host_memory_is_bounded_by_one_layer_whatever_the_number_of_layers(mesh_load):
    """On the CPU, device memory is host memory: the params' own bytes are resident too.

    After the first two layers (the first also compiles the conversion), the resident
    memory must not grow from layer to layer: the stacks are allocated whole up front, and
    a reader that kept the memory-mapped files open would add each layer's bfloat16 bytes
    (half its float32 bytes) as it reads them: four layers' worth here. And each later
    layer's peak stays within three layers' float32 bytes of the memory resident before it
    (measured: about one and a half): in flight are one weight matrix read (bfloat16 and
    float32 copies), its copy on the converting device, its SVD's factors and workspace,
    ``[W; A]`` and its FP8 copy, that copy on the host and its slices; the largest matrix
    is 27% of a layer here. Reading the whole checkpoint at once would take 9 layers.
    """
    layer = one_layer_f32_bytes(SHRUNK_70B)
    steps = mesh_load["steps"]
    growth = steps[-1]["rss"] - steps[1]["rss"]
    assert growth < layer / 2, (growth, layer)
    for before, during in zip(steps, steps[1:], strict=False):
        assert during["peak"] - before["rss"] <= 3 * layer, (during["layer"], during["peak"],
                                                             before["rss"], layer)
