"""What an export holds: formats, file names, HF tensor names of the adapted layers."""

from __future__ import annotations

import ml_dtypes
import numpy as np

FORMATS = ("hf", "fp8")
DTYPES = ("bfloat16", "float32")
FORMAT_VERSION = 2  # 2: PEFT adapter for FALQON's b
MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EXTRAS_FILE = "falqon_extras.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's prefix of adapter tensor names
SHARD_BYTES = 5 * 2**30
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
LAYER_PATHS = {  # target -> (group, projection) in params["layers"] and in HF names
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
NORMS = ("input_layernorm", "post_attention_layernorm")
NP_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


class ExportError(ValueError):
    """An export that cannot be done; the message is one line saying why."""


def hf_name(target: str, i: int) -> str:
    """The Hugging Face module name of layer ``i``'s ``target`` projection, e.g.
    ``model.layers.3.self_attn.q_proj``."""
    group, proj = LAYER_PATHS[target]
    return f"model.layers.{i}.{group}.{proj}"
