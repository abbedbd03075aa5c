"""Writing an export: the tensors of each format, the PEFT adapter of FALQON's ``b``,
config files, and the atomic write of the output directory."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from falqon_jax import melded
from falqon_jax.export.layout import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    DTYPES,
    E4M3,
    EXTRAS_FILE,
    FORMAT_VERSION,
    FORMATS,
    INDEX_FILE,
    LAYER_PATHS,
    MODEL_FILE,
    NORMS,
    NP_DTYPES,
    PEFT_PREFIX,
    SHARD_BYTES,
    TOKENIZER_FILES,
    ExportError,
    hf_name,
)
from falqon_jax.export.weights import (
    base_weight,
    check_proxy_b,
    effective_weight,
    fp8_weight,
    is_fp8_layer,
    np32,
)
from falqon_jax.model import methods
from falqon_jax.model.config import LlamaConfig
from falqon_jax.model.llama import (
    TARGETS,
    LinearPlan,
    LlamaModel,
)

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


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array, np.float32).astype(dtype))


def _dense_tensors(model: LlamaModel, dtype: np.dtype) -> list[_Tensor]:
    """Embeddings and norms (everything but the linear layers), in ``dtype``."""
    params, config = model.params, model.config
    hidden, layers = (config.hidden_size,), config.num_layers
    out = [
        _Tensor("model.embed_tokens.weight", (config.vocab_size, config.hidden_size), dtype,
                lambda: _cast(np32(params["embed_tokens"]), dtype)),
        _Tensor("model.norm.weight", hidden, dtype,
                lambda: _cast(np32(params["norm"]["weight"]), dtype)),
    ]
    for i in range(layers):
        for norm in NORMS:
            out.append(_Tensor(
                f"model.layers.{i}.{norm}.weight", hidden, dtype,
                lambda i=i, norm=norm: _cast(np32(params["layers"][norm]["weight"][i]), dtype),
            ))
    return out


def _linears(model: LlamaModel) -> Iterator[tuple[str, str, Any, Callable[[], Any]]]:
    """``(target, hf_prefix, stacked_params, get_layer)`` for every linear layer."""
    layers = model.params["layers"]
    for i in range(model.config.num_layers):
        for target, (group, proj) in LAYER_PATHS.items():
            stacked = layers[group][proj]
            yield target, hf_name(target, i), stacked, lambda s=stacked, i=i: _layer(s, i)
    if "lm_head" in model.params:
        head = model.params["lm_head"]
        yield "lm_head", "lm_head", head, lambda h=head: h


def hf_tensors(model: LlamaModel, dtype: str = "bfloat16") -> list[_Tensor]:
    """The tensors of an ``hf`` export, Hugging Face names, effective weights in ``dtype``."""
    np_dtype = NP_DTYPES[dtype]
    out = _dense_tensors(model, np_dtype)
    for _, prefix, stacked, get in _linears(model):
        out.append(_Tensor(f"{prefix}.weight", _linear_shape(stacked), np_dtype,
                           lambda get=get, p=prefix: _cast(effective_weight(get(), p), np_dtype)))
    return out


def fp8_layer_targets(model: LlamaModel) -> set[str]:
    """Targets written as FP8: the model's FP8 layers (FALQON, fp8_lora) if it has any, else
    every decoder projection whose dimensions are multiples of 16."""
    layers = model.params["layers"]
    fp8_targets = {t for t, (g, p) in LAYER_PATHS.items() if is_fp8_layer(layers[g][p])}
    if "lm_head" in model.params and is_fp8_layer(model.params["lm_head"]):
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
    np_dtype = NP_DTYPES[dtype]
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
        home.append(_Tensor(f"{prefix}.weight", shape, E4M3,
                            lambda g=get, p=prefix: np.ascontiguousarray(fp8_weight(g(), p)[0])))
        home.append(_Tensor(f"{prefix}.weight_scale", (1,), np.dtype(np.float32),
                            lambda g=get, p=prefix: np.asarray([fp8_weight(g(), p)[1]])))
        if falqon_a and isinstance(stacked, melded.MeldedLinear):
            extras.append(_Tensor(f"{prefix}.falqon_a", (stacked.rank, shape[1]), E4M3,
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
        check_proxy_b(stacked, prefix)
        found = found or bool(np.any(np32(stacked.b) != 0))
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
                           lambda g=get: np.ascontiguousarray(np32(g().a()))))
        out.append(_Tensor(f"{name}.lora_B.weight", (out_f, stacked.rank), f32,
                           lambda g=get: np.ascontiguousarray(np32(g().b))))
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

