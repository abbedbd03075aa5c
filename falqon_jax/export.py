"""``python -m falqon_jax.export``: write a model as a Hugging Face checkpoint or as FP8 weights.

Sources: a training run (``OUT``, its latest checkpoint), one checkpoint
(``OUT/checkpoints/STEP``), a Hugging Face LLaMA directory (converted with ``--method``)
or an FP8 export. ``--out`` must not exist or be an empty directory; the export is written
to a temporary sibling directory and renamed into place at the end, so a failed export
leaves nothing behind.

Format ``hf``: a plain LLaMA checkpoint any Hugging Face loader reads::

    config.json            transformers.LlamaConfig (``dtype``: the export dtype)
    model.safetensors      (or model-0000i-of-0000N.safetensors + index, 5 GiB shards)
    tokenizer files        copied from the source (or --tokenizer), when known

Tensors use the Hugging Face names (``model.embed_tokens.weight``,
``model.layers.N.self_attn.q_proj.weight`` ..., ``model.norm.weight``, ``lm_head.weight``)
in ``--dtype`` (bfloat16 by default, or float32). Linear weights are the *effective*
weights the model computes with, ``(out, in)``:

* ``full`` / ``frozen``: the weight itself;
* ``falqon``: ``DQ(w8[:out]) + b DQ(w8[out:])`` with ``DQ(w) = w * scale`` (float32
  ``DQ``, the sum in float64, rounded once; ``b`` is zero for the proxy update rules, which
  is checked, and updates still waiting in their proxy buffer are not part of the model);
* ``lora`` / ``qlora`` / ``fp8_lora``: ``W + (alpha / rank) B A`` with ``W`` dequantized
  from NF4 or FP8 first.

A model with its own ``lm_head`` is written untied (``tie_word_embeddings: false``).

Format ``fp8``: a compressed-tensors checkpoint (``quant_method: compressed-tensors``,
``format: float-quantized``), the layout vLLM and transformers read for FP8 models, with
static per-tensor FP8 weights and dynamic per-tensor FP8 activations::

    config.json
      quantization_config:
        quant_method: compressed-tensors, format: float-quantized,
        quantization_status: compressed, kv_cache_scheme: null,
        config_groups.group_0:
          targets: [Linear]
          weights:           {num_bits: 8, type: float, symmetric: true,
                              strategy: tensor, dynamic: false, observer: minmax}
          input_activations: {num_bits: 8, type: float, symmetric: true,
                              strategy: tensor, dynamic: true, observer: null}
        ignore: [every linear layer kept in --dtype, e.g. lm_head]
      falqon_jax: {format_version, methods, rank, alpha, fp8_targets, adapter}
                  (informational)
    model.safetensors  (+ model.safetensors.index.json listing only the model shards)
      <layer>.weight          float8_e4m3fn (out, in)   FP8 layers
      <layer>.weight_scale    float32 (1,)              dequantization multiplier:
                                                          W = weight.astype(f32) * weight_scale
      (no <layer>.input_scale: activations are scaled dynamically, amax / 448 per tensor)
      everything else         --dtype: embeddings, norms, lm_head, unconverted layers
    falqon_extras.safetensors  (not in the index, so serving stacks never load it)
      <layer>.falqon_a        float8_e4m3fn (rank, in)  FALQON's frozen A rows, same scale
      lm_head.weight, lm_head.weight_scale, lm_head.falqon_a
                              an FP8 lm_head (``--targets ... lm_head``): serving stacks
                              keep lm_head unquantized, so model.safetensors holds it
                              dequantized (FALQON: DQ(w8[:out]), without b) and its FP8
                              data lives here
    adapter_config.json, adapter_model.safetensors
                              only when some FALQON layer has a non-zero b: a PEFT LoRA
                              adapter on the FP8 base, loaded with
                              ``PeftModel.from_pretrained(base_model, out)`` (transformers'
                              ``from_pretrained(out)`` picks it up too; not tested here)
      base_model.model.<layer>.lora_A.weight  float32 (rank, in)  DQ(w8[out:]) = A
      base_model.model.<layer>.lora_B.weight  float32 (out, rank) b
                              for every FALQON layer (lm_head included), with r =
                              lora_alpha = rank (scaling 1), target_modules = their HF
                              module names, base_model_name_or_path "." (this directory)

For FALQON, ``weight`` is exactly ``w8[:out]`` with the layer's own ``scale``,
``falqon_a`` is ``w8[out:]`` and ``b`` is never dropped: the FP8 base plus the adapter
compute ``W + B A``, the effective weight (a serving stack that loads the base without
the adapter serves the model with ``b = 0``). :func:`load_fp8_export` rebuilds every melded
layer bit for bit, ``b`` included, as method ``falqon`` (live ``b``, ``b_in_forward=True``;
a proxy-rule model, whose ``b`` is zero, computes the same); ``--no-falqon-a`` leaves the A
rows out of the extras, and with an adapter they are recovered exactly from ``lora_A``.
``fp8_lora`` layers whose
``b`` is zero keep their FP8 bits; other FP8-method layers, ``fp8_lora`` with a non-zero
``b`` included, are re-quantized from their effective weight (no adapter: their ``B A`` is
merged into the FP8 weight). A model without FP8 layers (``full``, ``lora``, ``qlora``)
gets every decoder projection whose dimensions are multiples of 16 quantized per tensor
(scale = amax / 448).

Mistakes (unknown format, missing source, a non-empty ``--out``) end with one line on
stderr and exit code 2; nothing is overwritten.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from falqon_jax import fp8, melded, methods
from falqon_jax.cli import OneLineParser
from falqon_jax.config import LlamaConfig
from falqon_jax.llama import ALL_TARGETS, TARGETS, LinearPlan, Llama, LlamaModel, abstract_params
from falqon_jax.run_loading import LoadError

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
_NP_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


class ExportError(ValueError):
    """An export that cannot be done; the message is one line saying why."""


# --------------------------------------------------------------------------------------
# Effective weights.


def _np32(x: Any) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


def _lora_delta(layer: Any) -> np.ndarray:
    """``(alpha / rank) B A``: float32 ``(out, in)``."""
    return np.float32(layer.scaling) * (_np32(layer.b) @ _np32(layer.a))


def _check_proxy_b(layer: melded.MeldedLinear, name: str) -> None:
    """Refuse a proxy-rule FALQON layer (``b_in_forward=False``) whose ``b`` is not zero.

    Such a layer never adds ``b (A x)`` in its forward pass, so a non-zero ``b`` is not part
    of the model and its state is corrupt (the proxy rules keep ``b = 0``)."""
    if not layer.b_in_forward and np.any(_np32(layer.b) != 0):
        raise ExportError(
            f"{name}: FALQON layer with a proxy update rule (b_in_forward=False) has a "
            "non-zero b (those rules keep b = 0); the state is corrupt or was not produced "
            "by falqon_update"
        )


def falqon_weight(layer: melded.MeldedLinear) -> np.ndarray:
    """FALQON's effective weight ``DQ(w8[:out]) + b DQ(w8[out:])``: float32 ``(out, in)``.

    ``layer`` is one unstacked layer. ``DQ`` is float32 as in :mod:`falqon_jax.melded`; the
    sum and ``b A`` are computed in float64 and rounded to float32 once, so ``b = 0`` gives
    ``DQ(w8[:out])`` bit for bit.
    """
    base = _np32(melded.dequantize(layer))
    b = _np32(layer.b)
    if not b.any():
        return base
    a = _np32(layer.a())
    return (base.astype(np.float64) + b.astype(np.float64) @ a.astype(np.float64)).astype(
        np.float32)


def effective_weight(layer: Any, name: str = "layer") -> np.ndarray:
    """The weight one (unstacked) linear layer computes with: float32 ``(out, in)``.

    Dense: ``w``; FALQON: ``DQ(w8[:out]) + b DQ(w8[out:])`` (:func:`falqon_weight`; a
    proxy-rule layer must have ``b = 0``); LoRA-style layers (``lora``, ``fp8_lora``,
    ``qlora``): ``W + (alpha / rank) B A``, ``W`` dequantized.
    """
    from falqon_jax import fp8_lora, lora, nf4, qlora

    if isinstance(layer, methods.Dense):
        return _np32(layer.w)
    if isinstance(layer, melded.MeldedLinear):
        _check_proxy_b(layer, name)
        return falqon_weight(layer)
    if isinstance(layer, lora.LoraLinear):
        return _np32(layer.w) + _lora_delta(layer)
    if isinstance(layer, fp8_lora.Fp8LoraLinear):
        return _np32(fp8.dequantize(layer.w8, layer.scale)) + _lora_delta(layer)
    if isinstance(layer, qlora.QLoraLinear):
        return _np32(nf4.dequantize_nf4(layer.w, jnp.float32)) + _lora_delta(layer)
    raise ExportError(f"{name}: cannot export a linear layer of type {type(layer).__name__}")


def base_weight(layer: Any, name: str = "layer") -> np.ndarray:
    """What an ``fp8`` export writes for a layer kept in ``--dtype`` (e.g. lm_head): float32
    ``(out, in)``. FALQON: the backbone ``DQ(w8[:out])`` alone, since its ``b`` travels in
    the PEFT adapter; anything else: :func:`effective_weight`."""
    if isinstance(layer, melded.MeldedLinear):
        _check_proxy_b(layer, name)
        return _np32(melded.dequantize(layer))
    return effective_weight(layer, name)


def _is_fp8_layer(layer: Any) -> bool:
    from falqon_jax import fp8_lora

    return isinstance(layer, melded.MeldedLinear | fp8_lora.Fp8LoraLinear)


def fp8_weight(layer: Any, name: str = "layer") -> tuple[np.ndarray, np.float32, np.ndarray | None]:
    """``(weight, scale, a)`` of one layer in FP8: float8_e4m3fn ``(out, in)``, the float32
    dequantization scale, and FALQON's ``A`` rows float8_e4m3fn ``(rank, in)`` (else None).

    FALQON layers (whatever their ``b``, which :func:`adapter_tensors` writes) and
    ``fp8_lora`` layers with ``b = 0`` keep their stored bits; anything else is quantized
    from its effective weight with a per-tensor scale (amax / 448).
    """
    from falqon_jax import fp8_lora

    if isinstance(layer, melded.MeldedLinear):
        _check_proxy_b(layer, name)
        w8 = np.asarray(layer.w8)
        return w8[: layer.out], np.float32(layer.scale), w8[layer.out :]
    if isinstance(layer, fp8_lora.Fp8LoraLinear) and not np.any(_np32(layer.b) != 0):
        return np.asarray(layer.w8), np.float32(layer.scale), None
    q, scale = fp8.quantize(jnp.asarray(effective_weight(layer, name)), fp8.E4M3)
    return np.asarray(q), np.float32(scale), None


# --------------------------------------------------------------------------------------
# What gets written.


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One tensor to write: produced on demand so only a shard is in memory at a time."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _layer(stacked: Any, i: int) -> Any:
    return jax.tree.map(lambda x: x[i], stacked)


def _linear_shape(layer: Any) -> tuple[int, int]:
    """``(out, in)`` of a stacked linear layer's params."""
    if isinstance(layer, melded.MeldedLinear):
        return layer.out, layer.in_features
    if isinstance(layer, methods.Dense):
        return tuple(layer.w.shape[-2:])
    return (layer.b.shape[-2], layer.a.shape[-1])


def _hf_name(target: str, i: int) -> str:
    group, proj = LAYER_PATHS[target]
    return f"model.layers.{i}.{group}.{proj}"


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array, np.float32).astype(dtype))


def _dense_tensors(model: LlamaModel, dtype: np.dtype) -> list[_Tensor]:
    """Embeddings and norms (everything but the linear layers), in ``dtype``."""
    params, config = model.params, model.config
    hidden, layers = (config.hidden_size,), config.num_layers
    out = [
        _Tensor("model.embed_tokens.weight", (config.vocab_size, config.hidden_size), dtype,
                lambda: _cast(_np32(params["embed_tokens"]), dtype)),
        _Tensor("model.norm.weight", hidden, dtype,
                lambda: _cast(_np32(params["norm"]["weight"]), dtype)),
    ]
    for i in range(layers):
        for norm in NORMS:
            out.append(_Tensor(
                f"model.layers.{i}.{norm}.weight", hidden, dtype,
                lambda i=i, norm=norm: _cast(_np32(params["layers"][norm]["weight"][i]), dtype),
            ))
    return out


def _linears(model: LlamaModel) -> Iterator[tuple[str, str, Any, Callable[[], Any]]]:
    """``(target, hf_prefix, stacked_params, get_layer)`` for every linear layer."""
    layers = model.params["layers"]
    for i in range(model.config.num_layers):
        for target, (group, proj) in LAYER_PATHS.items():
            stacked = layers[group][proj]
            yield target, _hf_name(target, i), stacked, lambda s=stacked, i=i: _layer(s, i)
    if "lm_head" in model.params:
        head = model.params["lm_head"]
        yield "lm_head", "lm_head", head, lambda h=head: h


def hf_tensors(model: LlamaModel, dtype: str = "bfloat16") -> list[_Tensor]:
    """The tensors of an ``hf`` export, Hugging Face names, effective weights in ``dtype``."""
    np_dtype = _NP_DTYPES[dtype]
    out = _dense_tensors(model, np_dtype)
    for _, prefix, stacked, get in _linears(model):
        out.append(_Tensor(f"{prefix}.weight", _linear_shape(stacked), np_dtype,
                           lambda get=get, p=prefix: _cast(effective_weight(get(), p), np_dtype)))
    return out


def fp8_layer_targets(model: LlamaModel) -> set[str]:
    """Targets written as FP8: the model's FP8 layers (FALQON, fp8_lora) if it has any, else
    every decoder projection whose dimensions are multiples of 16."""
    layers = model.params["layers"]
    fp8_targets = {t for t, (g, p) in LAYER_PATHS.items() if _is_fp8_layer(layers[g][p])}
    if "lm_head" in model.params and _is_fp8_layer(model.params["lm_head"]):
        fp8_targets.add("lm_head")
    if fp8_targets:
        return fp8_targets
    return {
        t for t, (g, p) in LAYER_PATHS.items()
        if melded.check_convertible(*_linear_shape(layers[g][p]), 1) is None
    }


def fp8_tensors(
    model: LlamaModel, dtype: str = "bfloat16", *, falqon_a: bool = True
) -> tuple[list[_Tensor], list[_Tensor], list[str]]:
    """``(model_tensors, extra_tensors, ignored_layers)`` of an ``fp8`` export.

    ``ignored_layers``: names of the linear layers written in ``dtype`` (the
    compressed-tensors ``ignore`` list).
    """
    np_dtype = _NP_DTYPES[dtype]
    main, extras, ignored = _dense_tensors(model, np_dtype), [], []
    targets = fp8_layer_targets(model)
    for target, prefix, stacked, get in _linears(model):
        shape = _linear_shape(stacked)
        if target not in targets or target == "lm_head":
            ignored.append(prefix)
            main.append(_Tensor(f"{prefix}.weight", shape, np_dtype,
                                lambda g=get, p=prefix: _cast(base_weight(g(), p), np_dtype)))
        if target not in targets:
            continue
        home = extras if target == "lm_head" else main
        home.append(_Tensor(f"{prefix}.weight", shape, _E4M3,
                            lambda g=get, p=prefix: np.ascontiguousarray(fp8_weight(g(), p)[0])))
        home.append(_Tensor(f"{prefix}.weight_scale", (1,), np.dtype(np.float32),
                            lambda g=get, p=prefix: np.asarray([fp8_weight(g(), p)[1]])))
        if falqon_a and isinstance(stacked, melded.MeldedLinear):
            extras.append(_Tensor(f"{prefix}.falqon_a", (stacked.rank, shape[1]), _E4M3,
                                  lambda g=get, p=prefix: np.ascontiguousarray(
                                      fp8_weight(g(), p)[2])))
    return main, extras, ignored


def _falqon_linears(model: LlamaModel) -> list[tuple[str, str, Any, Callable[[], Any]]]:
    """The ``_linears`` entries whose layers are FALQON melded layers."""
    return [e for e in _linears(model) if isinstance(e[2], melded.MeldedLinear)]


def needs_adapter(model: LlamaModel) -> bool:
    """Whether an ``fp8`` export of ``model`` writes a PEFT adapter: some FALQON layer has a
    non-zero ``b`` (a proxy-rule layer with one is refused with :class:`ExportError`)."""
    found = False
    for _, prefix, stacked, _ in _falqon_linears(model):
        _check_proxy_b(stacked, prefix)
        found = found or bool(np.any(_np32(stacked.b) != 0))
    return found


def adapter_tensors(model: LlamaModel) -> list[_Tensor]:
    """The PEFT LoRA tensors of an ``fp8`` export: for every FALQON layer ``<layer>``,

    * ``base_model.model.<layer>.lora_A.weight`` float32 ``(rank, in)``: ``DQ(w8[out:])``,
    * ``base_model.model.<layer>.lora_B.weight`` float32 ``(out, rank)``: ``b``,

    so that with ``lora_alpha = r`` (scaling 1) ``W + B A`` is the effective weight.
    Empty when every ``b`` is zero (:func:`needs_adapter`).
    """
    if not needs_adapter(model):
        return []
    f32 = np.dtype(np.float32)
    out: list[_Tensor] = []
    for _, prefix, stacked, get in _falqon_linears(model):
        out_f, in_f = _linear_shape(stacked)
        name = f"{PEFT_PREFIX}{prefix}"
        out.append(_Tensor(f"{name}.lora_A.weight", (stacked.rank, in_f), f32,
                           lambda g=get: np.ascontiguousarray(_np32(g().a()))))
        out.append(_Tensor(f"{name}.lora_B.weight", (out_f, stacked.rank), f32,
                           lambda g=get: np.ascontiguousarray(_np32(g().b))))
    return out


def adapter_config(model: LlamaModel) -> dict[str, Any]:
    """``adapter_config.json`` of the PEFT adapter (:func:`adapter_tensors`): a plain LoRA
    with ``r = lora_alpha = rank`` on the HF modules that are FALQON layers, whose base
    model is the export itself (``base_model_name_or_path: "."``)."""
    entries = _falqon_linears(model)
    ranks = {stacked.rank for _, _, stacked, _ in entries}
    if len(ranks) != 1:
        raise ExportError(f"FALQON layers have different ranks {sorted(ranks)}; a PEFT "
                          "adapter needs one")
    rank = ranks.pop()
    modules = {"lm_head" if t == "lm_head" else LAYER_PATHS[t][1] for t, _, _, _ in entries}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": ".",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(modules),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }


# --------------------------------------------------------------------------------------
# Files.


def _shards(tensors: list[_Tensor], limit: int) -> list[list[_Tensor]]:
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_tensors(
    directory: Path, tensors: list[_Tensor], *, index: bool = False, shard_bytes: int = SHARD_BYTES
) -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` (or numbered shards plus an index when
    larger than ``shard_bytes``; ``index=True`` writes the index for one file too).
    Returns the file names."""
    shards = _shards(tensors, shard_bytes)
    names = [MODEL_FILE] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
    ]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file({t.name: t.make() for t in shard}, str(directory / name),
                  metadata={"format": "pt"})
        weight_map.update({t.name: name for t in shard})
    if index or len(shards) > 1:
        total = sum(t.nbytes for t in tensors)
        (directory / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return names


def hf_config_dict(config: LlamaConfig, *, tie: bool, dtype: str) -> dict[str, Any]:
    """A Hugging Face ``config.json`` (as a dict) for ``config``, via ``transformers``."""
    import transformers

    rope = None
    if config.rope_scaling is not None:
        rope = dataclasses.asdict(config.rope_scaling)
        if rope["rope_type"] == "linear":
            rope = {"rope_type": "linear", "factor": rope["factor"]}
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) \
        else config.eos_token_id
    hf = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=rope,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=tie,
        bos_token_id=config.bos_token_id,
        eos_token_id=eos,
        architectures=["LlamaForCausalLM"],
        dtype=dtype,
    )
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        return json.loads((Path(tmp) / "config.json").read_text())


def quantization_config(ignored: list[str]) -> dict[str, Any]:
    """The compressed-tensors ``quantization_config``: static per-tensor FP8 (E4M3)
    weights, dynamic per-tensor FP8 activations, ``ignored`` layers left unquantized."""

    def args(dynamic: bool) -> dict[str, Any]:
        return {
            "num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
            "strategy": "tensor", "block_structure": None, "dynamic": dynamic,
            "actorder": None, "observer": None if dynamic else "minmax", "observer_kwargs": {},
        }

    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": args(False),
                "input_activations": args(True),
                "output_activations": None,
            }
        },
        "ignore": list(ignored),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _method_names(plan: LinearPlan) -> dict[str, str]:
    return {t: getattr(plan, t) for t in (*TARGETS, "lm_head")}


def export_model(
    model: LlamaModel,
    out: str | os.PathLike[str],
    *,
    format: str = "hf",
    dtype: str = "bfloat16",
    tokenizer_dir: str | os.PathLike[str] | None = None,
    falqon_a: bool = True,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write ``model`` to the new directory ``out`` (see the module docstring for layouts).

    Args:
      model: any :class:`LlamaModel` (any linear methods).
      out: a path that does not exist yet, or an empty directory.
      format: ``"hf"`` or ``"fp8"``.
      dtype: ``"bfloat16"`` or ``"float32"`` for every tensor that is not FP8.
      tokenizer_dir: copy the tokenizer files found there.
      falqon_a: ``fp8`` only: keep FALQON's A rows in ``falqon_extras.safetensors``.
      shard_bytes: largest safetensors file before splitting into shards.

    Returns:
      ``out`` as a :class:`Path`. Raises :class:`ExportError` for a bad ``format``,
      ``dtype`` or ``out``; nothing is written then, and a failure midway leaves ``out``
      untouched.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    target = Path(out)
    check_out(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        _write(model, tmp, format, dtype, falqon_a, shard_bytes)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        check_out(target)
        _relax_permissions(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _relax_permissions(directory: Path) -> None:
    """Give the temporary directory and its files the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        os.chmod(path, 0o666 & ~umask)


def check_out(out: Path) -> None:
    """Refuse an ``out`` that is a file or a non-empty directory (:class:`ExportError`)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {out} already exists and is not empty; choose a new directory")


def _write(model: LlamaModel, tmp: Path, format: str, dtype: str, falqon_a: bool,
           shard_bytes: int) -> None:
    tie = "lm_head" not in model.params
    config = hf_config_dict(model.config, tie=tie, dtype=dtype)
    if format == "hf":
        write_tensors(tmp, hf_tensors(model, dtype), shard_bytes=shard_bytes)
    else:
        main, extras, ignored = fp8_tensors(model, dtype, falqon_a=falqon_a)
        write_tensors(tmp, main, index=True, shard_bytes=shard_bytes)
        if extras:
            save_file({t.name: t.make() for t in extras}, str(tmp / EXTRAS_FILE),
                      metadata={"format": "pt"})
        adapter = adapter_tensors(model)
        if adapter:
            save_file({t.name: t.make() for t in adapter}, str(tmp / ADAPTER_FILE),
                      metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(
                json.dumps(adapter_config(model), indent=2, sort_keys=True) + "\n")
        config["quantization_config"] = quantization_config(ignored)
        config["falqon_jax"] = {
            "format_version": FORMAT_VERSION,
            "methods": _method_names(model.plan),
            "rank": model.plan.rank,
            "alpha": model.plan.alpha,
            "fp8_targets": sorted(fp8_layer_targets(model)),
            "adapter": ADAPTER_FILE if adapter else None,
        }
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------
# Reading an FP8 export back.

_ST_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": _E4M3,
}


class _SafeTensors:
    """Minimal read-only safetensors reader (numpy + ml_dtypes, FP8 included)."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for path in files:
            with path.open("rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            for name, info in header.items():
                self._where[name] = (path, info, 8 + size)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        """Every tensor name (from the headers)."""
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (from the header, nothing read)."""
        if name not in self._where:
            raise LoadError(f"FP8 export lacks tensor {name!r}")
        return tuple(self._where[name][1]["shape"])

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` with its stored dtype; ``LoadError`` if absent or unsupported."""
        if name not in self._where:
            raise LoadError(f"FP8 export lacks tensor {name!r}")
        path, info, base = self._where[name]
        if info["dtype"] not in _ST_DTYPES:
            raise LoadError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype = _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        with path.open("rb") as f:
            f.seek(base + start)
            data = f.read(end - start)
        return np.frombuffer(data, dtype).reshape(info["shape"])


def _export_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / MODEL_FILE).is_file():
        return [directory / MODEL_FILE]
    found = sorted(p for p in directory.glob("*.safetensors")
                   if p.name not in (EXTRAS_FILE, ADAPTER_FILE))
    if not found:
        raise LoadError(f"{directory} holds no *.safetensors weights")
    return found


def _check_quantization(directory: Path, raw: dict[str, Any]) -> None:
    quant = raw.get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors":
        raise LoadError(f"{directory} is not a compressed-tensors FP8 checkpoint")
    for name, group in (quant.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if (w.get("type"), w.get("num_bits"), w.get("strategy")) != ("float", 8, "tensor"):
            raise LoadError(
                f"{directory}: quantization group {name} is not per-tensor FP8 weights "
                "(only that scheme is supported)"
            )


def load_fp8_export(
    directory: str | os.PathLike[str],
    *,
    dtype: str = "bfloat16",
    rank: int | None = None,
    alpha: float | None = None,
    seed: int = 0,
) -> LlamaModel:
    """Load an ``fp8`` export (or any compressed-tensors per-tensor FP8 LLaMA).

    FP8 layers whose FALQON ``A`` rows are known -- ``falqon_a`` in
    ``falqon_extras.safetensors``, or the ``lora_A`` of the PEFT adapter beside the export
    (``adapter_config.json`` + ``adapter_model.safetensors``, re-quantized with the layer's
    ``weight_scale`` and checked to be exact) -- come back as FALQON melded layers (method
    ``falqon``, ``b_in_forward=True``): ``w8 = [weight; A rows]`` and ``scale =
    weight_scale`` bit for bit, ``b`` = the adapter's float32 ``lora_B`` bit for bit, or
    zero without an adapter; ready to resume fine-tuning. FP8 layers without ``A`` rows
    become ``fp8_lora`` layers (the stored FP8 weight plus a fresh adapter with ``b = 0``,
    so their output is the plain FP8 GEMM) of rank ``rank`` (default 16, at most the
    smallest layer dimension). Other tensors are read in ``dtype``. Raises
    :class:`~falqon_jax.run_loading.LoadError` for anything else, including an adapter that
    was not written by :func:`export_model` (``lora_alpha != r``, DoRA, rsLoRA, per-module
    ranks, a ``lora_A`` that is not the layer's ``A`` rows, or a module that is not an FP8
    layer).
    """
    directory = Path(directory)
    if dtype not in DTYPES:
        raise LoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    raw = _read_config(directory)
    _check_quantization(directory, raw)
    config = LlamaConfig.from_hf(directory)
    meta = raw.get("falqon_jax") or {}
    extras_path = directory / EXTRAS_FILE
    reader = _Fp8Reader(_SafeTensors(_export_files(directory)),
                        _SafeTensors([extras_path] if extras_path.is_file() else []),
                        _Adapter.read(directory))
    prefixes = {t: [_hf_name(t, i) for i in range(config.num_layers)] for t in LAYER_PATHS}
    has_head = "lm_head.weight" in reader.main or "lm_head.weight" in reader.extras
    if has_head:
        prefixes["lm_head"] = ["lm_head"]
    kinds = {}
    for target, names in prefixes.items():
        seen = {reader.kind(name) for name in names}
        if len(seen) != 1:
            raise LoadError(f"{directory}: {target} layers mix FP8 and unquantized weights")
        kinds[target] = seen.pop()
    kinds.setdefault("lm_head", "frozen")
    if has_head and config.tie_word_embeddings and kinds["lm_head"] == "frozen":
        del prefixes["lm_head"]  # tied: the module reuses the embedding
    a_ranks = {reader.a_rank(name) for t, names in prefixes.items() if kinds[t] == "falqon"
               for name in names}
    if len(a_ranks) > 1:
        raise LoadError(f"{directory}: falqon_a ranks differ between layers: {sorted(a_ranks)}")
    if a_ranks:
        rank = a_ranks.pop()
    else:  # a fresh fp8_lora adapter: at most the smallest FP8 layer's dimension
        smallest = min((min(reader.shape(names[0])) for t, names in prefixes.items()
                        if kinds[t] == "fp8_lora"), default=16)
        rank = min(int(rank or 16), smallest)
    alpha = float(alpha if alpha is not None else meta.get("alpha", 16.0))
    jdtype = jnp.dtype(dtype)
    key = jax.random.key(seed)

    def stack(target: str) -> Any:
        items = [
            reader.linear(name, kinds[target], rank, alpha, jdtype,
                          jax.random.fold_in(key, ALL_TARGETS.index(target) * 100_000 + i))
            for i, name in enumerate(prefixes[target])
        ]
        return items[0] if target == "lm_head" else jax.tree.map(lambda *x: jnp.stack(x), *items)

    layers: dict[str, Any] = {
        norm: {"weight": jnp.asarray(np.stack(
            [reader.dense(f"model.layers.{i}.{norm}.weight") for i in range(config.num_layers)]
        ))}
        for norm in NORMS
    }
    for target, (group, proj) in LAYER_PATHS.items():
        layers.setdefault(group, {})[proj] = stack(target)
    params: dict[str, Any] = {
        "embed_tokens": jnp.asarray(reader.dense("model.embed_tokens.weight"), jdtype),
        "layers": layers,
        "norm": {"weight": jnp.asarray(reader.dense("model.norm.weight"))},
    }
    if "lm_head" in prefixes:
        params["lm_head"] = stack("lm_head")
    reader.adapter.check_all_used({name for t, names in prefixes.items()
                                   if kinds[t] == "falqon" for name in names})
    plan = LinearPlan(**kinds, rank=rank, alpha=alpha, train_base=False)
    module = Llama(config, plan, jdtype)
    if jax.tree.structure(params) != jax.tree.structure(abstract_params(module)):
        raise LoadError(f"{directory}: its tensors do not form the LLaMA of its config.json")
    return LlamaModel(module, params)


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise LoadError(f"{directory} has no readable config.json") from None


class _Adapter:
    """The PEFT LoRA adapter beside an FP8 export (none: no tensors).

    Only what :func:`export_model` writes is accepted: plain LoRA with ``lora_alpha = r``
    (scaling 1), so ``lora_B`` is FALQON's ``b`` as it is.
    """

    def __init__(self, tensors: _SafeTensors, rank: int | None) -> None:
        self.tensors, self.rank = tensors, rank

    @classmethod
    def read(cls, directory: Path) -> _Adapter:
        """The adapter in ``directory`` (config and tensors), or an empty one."""
        config_path = directory / ADAPTER_CONFIG
        if not config_path.is_file():
            return cls(_SafeTensors([]), None)
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise LoadError(f"{config_path} is not readable JSON") from None
        problem = _adapter_problem(config)
        if problem:
            raise LoadError(f"{config_path}: {problem}; only adapters written by "
                            "falqon_jax.export (plain LoRA, lora_alpha = r) are supported")
        if not (directory / ADAPTER_FILE).is_file():
            raise LoadError(f"{directory} has {ADAPTER_CONFIG} but no {ADAPTER_FILE}")
        return cls(_SafeTensors([directory / ADAPTER_FILE]), int(config["r"]))

    @staticmethod
    def _name(prefix: str, factor: str) -> str:
        return f"{PEFT_PREFIX}{prefix}.lora_{factor}.weight"

    def has(self, prefix: str) -> bool:
        """Whether the adapter holds ``prefix``'s ``lora_A`` or ``lora_B``."""
        return any(self._name(prefix, f) in self.tensors for f in "AB")

    def factor(self, prefix: str, factor: str, shape: tuple[int, int]) -> np.ndarray:
        """``lora_A`` (``factor="A"``, ``(r, in)``) or ``lora_B`` (``"B"``, ``(out, r)``) of
        ``prefix``: float32, checked to have ``shape``."""
        array = self.tensors.get(self._name(prefix, factor))
        if array.dtype != np.float32 or tuple(array.shape) != shape:
            raise LoadError(f"adapter tensor {self._name(prefix, factor)} is {array.dtype} "
                            f"{tuple(array.shape)}, expected float32 {shape}")
        return array

    def check_all_used(self, prefixes: set[str]) -> None:
        """Refuse adapter tensors for anything but the FALQON layers ``prefixes``."""
        used = {self._name(p, f) for p in prefixes for f in "AB"}
        stray = sorted(set(self.tensors.names()) - used)
        if stray:
            raise LoadError(f"adapter tensor {stray[0]} belongs to no FP8 layer of the export "
                            f"({len(stray)} such tensors)")


def _adapter_problem(config: Any) -> str | None:
    """Why a PEFT ``adapter_config.json`` is not one :func:`export_model` writes, or None."""
    if not isinstance(config, dict):
        return "not a JSON object"
    if config.get("peft_type") != "LORA":
        return f"peft_type is {config.get('peft_type')!r}, not 'LORA'"
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, int | float) or alpha != r:
        return f"lora_alpha ({alpha!r}) must equal r ({r!r})"
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(flag):
            return f"{flag} is set"
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            return f"{pattern} is not empty"
    return None


class _Fp8Reader:
    """Reads one linear layer of an FP8 export (``main`` tensors, then ``extras``, plus the
    PEFT ``adapter``)."""

    def __init__(self, main: _SafeTensors, extras: _SafeTensors, adapter: _Adapter) -> None:
        self.main, self.extras, self.adapter = main, extras, adapter

    def _store(self, prefix: str) -> _SafeTensors | None:
        """The file holding ``prefix``'s FP8 weight (extras first: an FP8 lm_head)."""
        for store in (self.extras, self.main):
            if f"{prefix}.weight_scale" in store:
                return store
        return None

    def kind(self, prefix: str) -> str:
        """``falqon`` (FP8 with A rows: ``falqon_a`` or an adapter), ``fp8_lora`` (FP8
        without) or ``frozen`` (unquantized)."""
        if self._store(prefix) is None:
            if self.adapter.has(prefix):
                raise LoadError(f"the adapter has {prefix}, an unquantized layer; only FP8 "
                                "(FALQON) layers can carry one")
            return "frozen"
        falqon = f"{prefix}.falqon_a" in self.extras or self.adapter.has(prefix)
        return "falqon" if falqon else "fp8_lora"

    def shape(self, prefix: str) -> tuple[int, ...]:
        """Shape of ``prefix``'s FP8 weight."""
        store = self._store(prefix)
        assert store is not None
        return store.shape(f"{prefix}.weight")

    def a_rank(self, prefix: str) -> int:
        """Rank of a FALQON layer: its ``falqon_a`` rows, else the adapter's ``r``."""
        if f"{prefix}.falqon_a" in self.extras:
            return int(self.extras.shape(f"{prefix}.falqon_a")[0])
        assert self.adapter.rank is not None
        return self.adapter.rank

    def dense(self, name: str) -> np.ndarray:
        """An unquantized tensor as float32 (refuses FP8 data without a scale)."""
        array = self.main.get(name)
        if array.dtype == _E4M3:
            raise LoadError(f"{name} is FP8 but has no weight_scale")
        return array.astype(np.float32)

    def falqon_rows(self, prefix: str, scale: np.float32, in_f: int) -> np.ndarray:
        """FALQON's ``A`` rows of ``prefix``: float8_e4m3fn ``(rank, in)``.

        From ``falqon_a`` if present, else re-quantized from the adapter's ``lora_A`` with
        ``scale``. With an adapter, ``lora_A`` must be exactly ``rows * scale`` (float32).
        """
        rank = self.a_rank(prefix)
        if f"{prefix}.falqon_a" in self.extras:
            rows = self.extras.get(f"{prefix}.falqon_a")
            if rows.dtype != _E4M3:
                raise LoadError(f"{prefix}.falqon_a is {rows.dtype}, expected float8_e4m3fn")
        else:
            rows = (self.adapter.factor(prefix, "A", (rank, in_f)) / scale).astype(_E4M3)
        if self.adapter.has(prefix):
            lora_a = self.adapter.factor(prefix, "A", (rank, in_f))
            if not np.array_equal(_bits(rows.astype(np.float32) * scale), _bits(lora_a)):
                raise LoadError(f"{prefix}: the adapter's lora_A is not the layer's FALQON A "
                                "rows (DQ(falqon_a) with its weight_scale)")
        return rows

    def falqon_b(self, prefix: str, out_f: int, rank: int) -> np.ndarray:
        """FALQON's ``b`` of ``prefix``: the adapter's ``lora_B``, float32 ``(out, rank)``,
        or zeros without one."""
        if self.adapter.has(prefix):
            return self.adapter.factor(prefix, "B", (out_f, rank))
        return np.zeros((out_f, rank), np.float32)

    def linear(self, prefix: str, kind: str, rank: int, alpha: float, dtype: Any,
               key: jax.Array) -> Any:
        """One layer's params for method ``kind``."""
        from falqon_jax import fp8_lora
        from falqon_jax.lora import _init_adapter

        if kind == "frozen":
            return methods.Dense(w=jnp.asarray(self.dense(f"{prefix}.weight"), dtype))
        store = self._store(prefix)
        assert store is not None
        w8 = store.get(f"{prefix}.weight")
        if w8.dtype != _E4M3:
            raise LoadError(f"{prefix}.weight is {w8.dtype}, expected float8_e4m3fn")
        scale = store.get(f"{prefix}.weight_scale").astype(np.float32).reshape(())
        out_f, in_f = w8.shape
        if kind == "falqon":
            rows = self.falqon_rows(prefix, scale, in_f)
            return melded.MeldedLinear(
                w8=jnp.asarray(np.concatenate([w8, rows], axis=0)), scale=jnp.asarray(scale),
                b=jnp.asarray(self.falqon_b(prefix, out_f, rank)), out=out_f, rank=rank,
                b_in_forward=True)
        if melded.check_convertible(out_f, in_f, rank):
            raise LoadError(f"{prefix}: {melded.check_convertible(out_f, in_f, rank)}")
        a, b = _init_adapter(key, out_f, in_f, rank)
        return fp8_lora.Fp8LoraLinear(w8=jnp.asarray(w8), scale=jnp.asarray(scale), a=a, b=b,
                                      rank=rank, alpha=alpha)


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(np.uint8)


# --------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = OneLineParser(
        prog="python -m falqon_jax.export",
        description="Export a training run, run checkpoint, Hugging Face checkpoint or FP8 "
        "export as a Hugging Face checkpoint (effective weights) or as FP8 weights with "
        "per-tensor scales (compressed-tensors layout).",
    )
    p.add_argument("--checkpoint", required=True,
                   help="run directory, OUT/checkpoints/STEP, HF directory or FP8 export")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--format", default="hf", choices=FORMATS, help="hf (default) or fp8")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                   help="dtype of every non-FP8 tensor (default bfloat16)")
    p.add_argument("--tokenizer", help="copy tokenizer files from this directory "
                   "(default: the source's, when known)")
    p.add_argument("--method", default="full",
                   help="linear method for converting a Hugging Face directory (default full)")
    p.add_argument("--rank", type=int, default=64, help="adapter rank for --method")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha for --method")
    p.add_argument("--no-falqon-a", dest="falqon_a", action="store_false",
                   help="fp8: leave FALQON's A rows out of falqon_extras.safetensors "
                   "(only needed to resume fine-tuning; the PEFT adapter written for a "
                   "non-zero b holds them anyway)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, or 2 for a mistake)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ExportError, LoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


_KIND_NAMES = {"run": "training run", "checkpoint": "run checkpoint",
               "hf": "Hugging Face checkpoint", "fp8": "FP8 export"}


def _run(args: argparse.Namespace) -> int:
    from falqon_jax.run_loading import kind_of, load_any

    out = Path(args.out)
    check_out(out)
    if kind_of(args.checkpoint) == "card":
        raise ExportError(f"--checkpoint {args.checkpoint} does not exist")
    if args.tokenizer is not None and not any(
        (Path(args.tokenizer) / name).is_file() for name in TOKENIZER_FILES
    ):
        raise ExportError(f"--tokenizer {args.tokenizer} holds no tokenizer files")
    if args.rank <= 0:
        raise ExportError(f"--rank must be positive, got {args.rank}")
    kind = kind_of(args.checkpoint)
    # Runs restore in their own dtype (their dense weights are stored in it). Other sources
    # load in float32 when it matters: float32 exports and FP8 quantization.
    dtype = "float32" if args.dtype == "float32" or args.format == "fp8" else "bfloat16"
    if kind in ("run", "checkpoint"):
        dtype = None
    with _quiet_conversion_warnings():
        loaded = load_any(args.checkpoint, method=args.method, rank=args.rank,
                          alpha=args.alpha, dtype=dtype)
    tokenizer = args.tokenizer or loaded.tokenizer_dir
    export_model(loaded.model, out, format=args.format, dtype=args.dtype,
                 tokenizer_dir=tokenizer, falqon_a=args.falqon_a)
    note = "" if tokenizer else " (no tokenizer files: pass --tokenizer DIR to add them)"
    what = _KIND_NAMES.get(loaded.kind, loaded.kind)
    print(f"exported {what} {args.checkpoint} to {out} ({args.format}, {args.dtype}){note}")
    return 0


@contextlib.contextmanager
def _quiet_conversion_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


if __name__ == "__main__":
    sys.exit(main())
