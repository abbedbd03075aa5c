"""Reading an FP8 export back into a :class:`~falqon_jax.model.llama.LlamaModel`, FP8 weights
bit for bit and FALQON's ``b`` from the PEFT adapter."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from falqon_jax import melded
from falqon_jax.export.layout import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    DTYPES,
    E4M3,
    EXTRAS_FILE,
    INDEX_FILE,
    LAYER_PATHS,
    MODEL_FILE,
    NORMS,
    PEFT_PREFIX,
    hf_name,
)
from falqon_jax.model import methods
from falqon_jax.model.config import LlamaConfig
from falqon_jax.model.llama import (
    ALL_TARGETS,
    LinearPlan,
    Llama,
    LlamaModel,
    abstract_params,
)
from falqon_jax.model.loading import LoadError

# --------------------------------------------------------------------------------------
# Reading an FP8 export back.

_ST_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": E4M3,
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
    zero without an adapter (for generation, or a trainer of one's own). FP8 layers without
    ``A`` rows become ``fp8_lora`` layers (the stored FP8 weight plus a fresh adapter with
    ``b = 0``, so their output is the plain FP8 GEMM) of rank ``rank`` (default 16, at most the
    smallest layer dimension). Other tensors are read in ``dtype``. Raises
    :class:`~falqon_jax.train.runs.LoadError` for anything else, including an adapter that
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
    prefixes, kinds = _layer_kinds(directory, reader, config)
    rank = _layer_rank(directory, reader, prefixes, kinds, rank)
    alpha = float(alpha if alpha is not None else meta.get("alpha", 16.0))
    jdtype = jnp.dtype(dtype)
    params = _read_params(reader, config, prefixes, kinds, rank, alpha, jdtype,
                          jax.random.key(seed))
    reader.adapter.check_all_used({name for t, names in prefixes.items()
                                   if methods.get(kinds[t]).melded for name in names})
    plan = LinearPlan(**kinds, rank=rank, alpha=alpha, train_base=False)
    module = Llama(config, plan, jdtype)
    if jax.tree.structure(params) != jax.tree.structure(abstract_params(module)):
        raise LoadError(f"{directory}: its tensors do not form the LLaMA of its config.json")
    return LlamaModel(module, params)


def _layer_kinds(directory: Path, reader: _Fp8Reader, config: LlamaConfig
                 ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The Hugging Face prefixes of each target's layers (``lm_head`` only if the export
    has its own) and each target's kind (``falqon``, ``fp8_lora`` or ``frozen``, one per
    target; ``lm_head`` always has one)."""
    prefixes = {t: [hf_name(t, i) for i in range(config.num_layers)] for t in LAYER_PATHS}
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
    return prefixes, kinds


def _layer_rank(directory: Path, reader: _Fp8Reader, prefixes: dict[str, list[str]],
                kinds: dict[str, str], rank: int | None) -> int:
    """The FALQON layers' one ``A`` rank; without any, ``rank`` (default 16) capped at the
    smallest dimension of the FP8 layers that get a fresh ``fp8_lora`` adapter."""
    a_ranks = {reader.a_rank(name) for t, names in prefixes.items() if methods.get(kinds[t]).melded
               for name in names}
    if len(a_ranks) > 1:
        raise LoadError(f"{directory}: falqon_a ranks differ between layers: {sorted(a_ranks)}")
    if a_ranks:
        return a_ranks.pop()
    smallest = min((min(reader.shape(names[0])) for t, names in prefixes.items()
                    if kinds[t] == "fp8_lora"), default=16)
    return min(int(rank or 16), smallest)


def _read_params(reader: _Fp8Reader, config: LlamaConfig, prefixes: dict[str, list[str]],
                 kinds: dict[str, str], rank: int, alpha: float, dtype: Any,
                 key: jax.Array) -> dict[str, Any]:
    """The :class:`Llama` params pytree: each target's layers stacked (``lm_head`` alone),
    norms float32, the embedding in ``dtype``; ``key`` seeds fresh ``fp8_lora`` adapters
    (folded in per target and layer)."""

    def stack(target: str) -> Any:
        items = [
            reader.linear(name, kinds[target], rank, alpha, dtype,
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
        "embed_tokens": jnp.asarray(reader.dense("model.embed_tokens.weight"), dtype),
        "layers": layers,
        "norm": {"weight": jnp.asarray(reader.dense("model.norm.weight"))},
    }
    if "lm_head" in prefixes:
        params["lm_head"] = stack("lm_head")
    return params


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
        return methods.FALQON.name if falqon else "fp8_lora"

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
        if array.dtype == E4M3:
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
            if rows.dtype != E4M3:
                raise LoadError(f"{prefix}.falqon_a is {rows.dtype}, expected float8_e4m3fn")
        else:
            rows = (self.adapter.factor(prefix, "A", (rank, in_f)) / scale).astype(E4M3)
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
        from falqon_jax.baselines import adapter, fp8_lora

        if kind == "frozen":
            return methods.Dense(w=jnp.asarray(self.dense(f"{prefix}.weight"), dtype))
        store = self._store(prefix)
        assert store is not None
        w8 = store.get(f"{prefix}.weight")
        if w8.dtype != E4M3:
            raise LoadError(f"{prefix}.weight is {w8.dtype}, expected float8_e4m3fn")
        scale = store.get(f"{prefix}.weight_scale").astype(np.float32).reshape(())
        out_f, in_f = w8.shape
        if methods.get(kind).melded:
            rows = self.falqon_rows(prefix, scale, in_f)
            return melded.MeldedLinear(
                w8=jnp.asarray(np.concatenate([w8, rows], axis=0)), scale=jnp.asarray(scale),
                b=jnp.asarray(self.falqon_b(prefix, out_f, rank)), out=out_f, rank=rank,
                b_in_forward=True)
        if melded.check_convertible(out_f, in_f, rank):
            raise LoadError(f"{prefix}: {melded.check_convertible(out_f, in_f, rank)}")
        return fp8_lora.Fp8LoraLinear(w8=jnp.asarray(w8), scale=jnp.asarray(scale),
                                      **adapter.adapter_fields(key, out_f, in_f, rank, alpha))


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(np.uint8)

