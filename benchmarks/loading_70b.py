"""Time and host memory of loading a LLaMA-70B-shaped checkpoint (BENCHMARKS.md, "Loading
LLaMA-70B: time and host memory").

    python benchmarks/loading_70b.py write --layers 2 --dir /tmp/llama70b   # random bf16 weights
    python benchmarks/loading_70b.py load --dir /tmp/llama70b --method falqon --rank 64 \\
        --targets up                                    # one measured load, a JSON line

``write`` builds a Hugging Face folder with LLaMA-70B's layer shapes (hidden 8192, MLP
28672, 64 heads / 8 KV heads of 128, vocab 32000) and ``--layers`` decoder layers of random
bfloat16 weights, one safetensors file per layer plus one for the embeddings and head, with
``model.safetensors.index.json``, as the Hub's sharded checkpoints are.

``load`` loads it once, in a fresh process, with
:func:`falqon_jax.model.loading.load_params` (the path ``load_model`` takes), and prints
the seconds each layer took (from the ``on_layer`` hook), the whole load's seconds (wall
clock, and the CPU time of all the process's threads: on a shared machine the second is
the steadier), and the process's peak resident memory over the load (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``, minus the resident memory before). On the
CPU the converted params are themselves host memory, so their bytes are printed beside it.
``--targets`` limits the FALQON conversion (and its SVDs) to some projections; the others
load as ``full`` bfloat16 weights.
Run from the repository root (``PYTHONPATH=.`` without an installed package).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
         "num_key_value_heads": 8, "vocab_size": 32000}


def hf_config(layers: int, **shape: int) -> dict:
    """A ``config.json`` of a LLaMA with ``layers`` decoder layers and ``shape``'s sizes."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "num_hidden_layers": layers, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", **shape}


def tensor_shapes(config: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """File name -> tensor name -> shape, one file per layer (HF names and layouts)."""
    h, m = config["hidden_size"], config["intermediate_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d
    v = config["vocab_size"]
    files = {"model-embed.safetensors": {"model.embed_tokens.weight": (v, h),
                                         "lm_head.weight": (v, h), "model.norm.weight": (h,)}}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        files[f"model-layer{i:03d}.safetensors"] = {
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
            p + "mlp.down_proj.weight": (h, m),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    return files


def write_checkpoint(directory: Path, config: dict, seed: int = 0) -> None:
    """Random ``N(0, 0.02)`` bfloat16 weights (unit norms) for ``config`` into ``directory``."""
    import ml_dtypes
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    rng = np.random.default_rng(seed)
    weight_map = {}
    for file, tensors in tensor_shapes(config).items():
        arrays = {}
        for name, shape in tensors.items():
            if len(shape) == 1:
                arrays[name] = np.ones(shape, ml_dtypes.bfloat16)
            else:
                arrays[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(
                    ml_dtypes.bfloat16)
            weight_map[name] = file
        save_file(arrays, str(directory / file))
        del arrays
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def memory_mib() -> dict[str, float]:
    """This process's ``VmRSS`` and ``VmHWM`` (peak) in MiB."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found


def measure_load(directory: Path, method: str, rank: int, targets: list[str] | None,
                 mesh_spec: str | None) -> dict:
    """One load of ``directory``: per-layer and total seconds, peak host memory (MiB)."""
    import jax
    import jax.numpy as jnp

    from falqon_jax.model.config import LlamaConfig
    from falqon_jax.model.llama import Llama, plan_linears
    from falqon_jax.model.loading import load_params
    from falqon_jax.sharding import parse_mesh

    config = LlamaConfig.from_hf(directory)
    module = Llama(config, plan_linears(config, method, targets=targets, rank=rank),
                   jnp.bfloat16)
    mesh = parse_mesh(mesh_spec) if mesh_spec else None
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = memory_mib()["VmRSS"]
    marks, cpu = [time.perf_counter()], [time.process_time()]

    def on_layer(i: int) -> None:
        marks.append(time.perf_counter())
        cpu.append(time.process_time())

    params = load_params(directory, module, jax.random.key(0), mesh=mesh, on_layer=on_layer)
    jax.block_until_ready(params)
    end, cpu_end = time.perf_counter(), time.process_time()
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    return {
        "method": method, "rank": rank, "targets": targets or "default", "mesh": mesh_spec,
        "layers": config.num_layers, "devices": jax.device_count(),
        "layer_s": [round(b - a, 2) for a, b in zip(marks[:-1], marks[1:], strict=True)],
        "layer_cpu_s": [round(b - a, 2) for a, b in zip(cpu[:-1], cpu[1:], strict=True)],
        "total_s": round(end - marks[0], 2), "total_cpu_s": round(cpu_end - cpu[0], 2),
        "peak_rss_delta_mib": round(memory_mib()["VmHWM"] - before, 1),
        "params_mib": round(nbytes / 2**20, 1), "jax": jax.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("write", "load"))
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--method", default="falqon")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--targets", default=None, help="comma-separated, e.g. up or k,v")
    parser.add_argument("--mesh", default=None, help="e.g. fsdp=8 (load onto a mesh)")
    args = parser.parse_args(argv)
    if args.what == "write":
        write_checkpoint(args.dir, hf_config(args.layers, **SHAPE))
        return 0
    targets = args.targets.split(",") if args.targets else None
    print(json.dumps(measure_load(args.dir, args.method, args.rank, targets, args.mesh)),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
