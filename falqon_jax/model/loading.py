"""Build a :class:`~falqon_jax.model.llama.LlamaModel` from a Hugging Face checkpoint (a local
directory or a Hub name) or a model card.

Checkpoints are read with ``safetensors`` one tensor at a time and converted layer by
layer into preallocated stacked device arrays, so memory holds the converted model plus
one float32 weight matrix in flight (a 7B LLaMA in bfloat16: ~14 GiB, not ~40).
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 & float8 with numpy, for safetensors)
import numpy as np
from jax import lax
from safetensors import safe_open

from falqon_jax.model.config import LlamaConfig, load_card
from falqon_jax.model.llama import (
    ALL_TARGETS,
    INIT_STD,
    Llama,
    LlamaModel,
    abstract_params,
    linear_shapes,
    plan_linears,
)

DTYPES = ("bfloat16", "float32")  # compute dtypes a model loads in


class LoadError(ValueError):
    """A path or setting that cannot be loaded (a checkpoint, run or export); the message is
    one line saying why."""

_HF_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_HF_NORMS = ("input_layernorm", "post_attention_layernorm")
_LAYER_PATHS = {target: tuple(name.split(".")) for target, name in _HF_LINEARS.items()}


def load_model(
    path_or_card: str | os.PathLike[str],
    *,
    method: str = "full",
    rank: int = 64,
    alpha: float = 16,
    dtype: str = "bfloat16",
    targets: Iterable[str] | None = None,
    init: str | None = None,
    seed: int = 0,
    remat: bool = False,
    attention: str = "xla",
) -> LlamaModel:
    """Load a LLaMA with its linear layers converted to ``method``.

    Args:
      path_or_card: a Hugging Face checkpoint directory (``config.json`` plus
        ``model.safetensors`` or sharded ``*.safetensors`` with
        ``model.safetensors.index.json``); a Hugging Face Hub name, ``org/name`` or
        ``org/name@revision`` (downloaded into the Hugging Face cache, or read from it
        offline; see :mod:`falqon_jax.model.resolve`); or a model-card name
        (``models/NAME.toml``), whose weights are the card's Hub ``source``. A local path wins
        over a Hub name.
      method: linear-layer method for the ``targets`` (see :mod:`falqon_jax.model.methods`).
      rank, alpha: adapter rank and scale, passed to the method.
      dtype: compute dtype, ``"bfloat16"`` or ``"float32"``.
      targets: layers to convert (``q k v o gate up down``, optionally ``lm_head``);
        default: the seven decoder projections. See :func:`falqon_jax.model.llama.plan_linears`.
      init: ``"random"`` for random weights of the architecture (a card's own, or a
        directory's or Hub model's config; no weights are read or downloaded).
      seed: PRNG seed for random init and for methods that draw random factors.
      remat: recompute each decoder layer in the backward pass (gradient checkpointing).
      attention: ``"xla"`` or ``"cudnn"`` (see :class:`~falqon_jax.model.llama.Llama`;
        :func:`falqon_jax.model.attention.choose` picks one for a platform).

    Returns:
      A :class:`LlamaModel`; ``model.logits(tokens, attention_mask)`` maps int
      ``(batch, seq)`` to float32 ``(batch, seq, vocab)``.

    Raises:
      ValueError: unknown card, a directory or Hub repository that is not a LLaMA
        checkpoint, missing weights, a card without a source and without
        ``init="random"``, a Hub name that cannot be fetched (one-line message).
    """
    if init not in (None, "random"):
        raise ValueError(f'init must be None or "random", got {init!r}')
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    config, source = _config_and_source(path_or_card, init)
    plan = plan_linears(config, method, targets=targets, rank=rank, alpha=alpha)
    module = Llama(config, plan, jnp.dtype(dtype), remat=remat, attention=attention)
    if source is None or init == "random":
        params = random_params(module, seed)
    else:
        params = load_params(source, module, jax.random.key(seed))
    return LlamaModel(module, params)


def _config_and_source(path_or_card: str | os.PathLike[str],
                       init: str | None) -> tuple[LlamaConfig, Path | None]:
    """The architecture of ``path_or_card`` and the checkpoint directory it names (``None``
    for a model card with ``init="random"``: nothing is read or downloaded but the card).

    With ``init="random"`` a directory or Hub model gives its config only (no weights)."""
    from falqon_jax.model.resolve import classify, model_directory

    if classify(path_or_card) == "card" and init == "random":
        return load_card(str(path_or_card)), None
    source = model_directory(path_or_card, weights=init != "random")
    _refuse_quantized(source)
    return LlamaConfig.from_hf(source), source


def _refuse_quantized(directory: Path) -> None:
    """``ValueError`` for a checkpoint whose ``config.json`` declares quantized weights
    (reading its raw FP8/int tensors as plain weights would silently give a wrong model)."""
    try:
        quant = json.loads((directory / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return  # LlamaConfig.from_hf reports a missing or unreadable config
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise ValueError(
            f"{directory} holds quantized weights ({method}); load a falqon-jax FP8 export "
            "with falqon_jax.export.load_fp8_export or falqon_jax.sources.load_any "
            "(the generate and export CLIs do this), or pass an unquantized checkpoint"
        )


def weight_files(directory: Path) -> list[Path]:
    """The ``*.safetensors`` files of a checkpoint, in shard order; ``ValueError`` if none."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise ValueError(
            f"{directory} holds no *.safetensors weights (only safetensors checkpoints are "
            'supported); pass init="random" for random weights'
        )
    return found


class _Checkpoint:
    """Tensor-by-tensor access to a (possibly sharded) safetensors checkpoint."""

    def __init__(self, files: list[Path], stack: contextlib.ExitStack) -> None:
        self._where: dict[str, Any] = {}
        for path in files:
            handle = stack.enter_context(safe_open(str(path), framework="numpy"))
            for name in handle.keys():
                self._where[name] = handle

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor ``name`` as float32, checked against ``shape``."""
        if name not in self._where:
            raise ValueError(f"checkpoint lacks tensor {name!r}")
        array = self._where[name].get_tensor(name)
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {array.shape}, expected {shape}")
        return array.astype(np.float32, copy=False)


class _RandomWeights:
    """Stand-in checkpoint: ``N(0, 0.02)`` weights and unit norms, seeded per tensor name."""

    def __init__(self, seed: int) -> None:
        self._seed = seed

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        rng = np.random.default_rng([self._seed, zlib.crc32(name.encode())])
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(INIT_STD)


def load_params(directory: Path, module: Llama, key: jax.Array) -> dict[str, Any]:
    """Read a Hugging Face LLaMA checkpoint and convert it into ``module``'s params pytree.

    ``key`` seeds methods that draw random factors. See :func:`convert_params`.
    """
    with contextlib.ExitStack() as stack:
        return convert_params(_Checkpoint(weight_files(directory), stack), module, key)


def random_params(module: Llama, seed: int = 0) -> dict[str, Any]:
    """Random ``N(0, 0.02)`` weights (unit norms) converted into ``module``'s params pytree.

    Streams like a checkpoint load, so it also works for models too big to build in float.
    """
    return convert_params(_RandomWeights(seed), module, jax.random.key(seed))


def convert_params(source: Any, module: Llama, key: jax.Array) -> dict[str, Any]:
    """Convert Hugging Face-named float weights into ``module``'s params pytree, streaming.

    ``source.read(name, shape)`` returns one float32 host tensor (HF layout, linear weights
    ``(out, in)``). The stacked layer params are preallocated on the device; each weight
    is converted by its layer's method and written into slot ``i`` by one jitted call that
    donates the stack, so memory holds the converted model plus one layer in flight.
    """
    config, plan = module.config, module.plan
    abstract = abstract_params(module)
    hidden = (config.hidden_size,)
    shapes = linear_shapes(config)
    embed_shape = (config.vocab_size, config.hidden_size)
    embed_name = "model.embed_tokens.weight"

    def target_key(target: str) -> jax.Array:
        return jax.random.fold_in(key, ALL_TARGETS.index(target))

    params: dict[str, Any] = {
        "embed_tokens": jnp.asarray(source.read(embed_name, embed_shape), module.dtype),
        "norm": {"weight": jnp.asarray(source.read("model.norm.weight", hidden))},
    }
    norms = {name: np.empty((config.num_layers, *hidden), np.float32) for name in _HF_NORMS}
    stacks = {
        target: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract["layers"][group][proj])
        for target, (group, proj) in _LAYER_PATHS.items()
    }
    store = {target: _layer_writer(plan.method(target), module) for target in _HF_LINEARS}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        for name in _HF_NORMS:
            norms[name][i] = source.read(f"{prefix}{name}.weight", hidden)
        for target, hf_name in _HF_LINEARS.items():
            w = source.read(f"{prefix}{hf_name}.weight", shapes[target])
            stacks[target] = store[target](stacks[target], w, target_key(target), i)
    layers: dict[str, Any] = {name: {"weight": jnp.asarray(norms[name])} for name in _HF_NORMS}
    for target, (group, proj) in _LAYER_PATHS.items():
        layers.setdefault(group, {})[proj] = stacks.pop(target)
    params["layers"] = layers
    if "lm_head" in abstract:
        w = source.read(embed_name if config.tie_word_embeddings else "lm_head.weight", embed_shape)
        method = plan.method("lm_head")
        params["lm_head"] = jax.jit(
            lambda w, k: method.init(w, plan.rank, alpha=plan.alpha, key=k, dtype=module.dtype)
        )(w, target_key("lm_head"))
    if jax.tree.structure(params) != jax.tree.structure(abstract):
        raise ValueError("converted params do not match the model's parameter structure")
    return params


def _layer_writer(method: Any, module: Llama) -> Callable[..., Any]:
    """``(stack, w, key, i) -> stack`` with layer ``i`` set to ``method.init(w)`` (jitted,
    ``stack`` donated so the update happens in place)."""
    plan = module.plan

    def write(stack: Any, w: jax.Array, key: jax.Array, layer: jax.Array) -> Any:
        new = method.init(
            w, plan.rank, alpha=plan.alpha, key=jax.random.fold_in(key, layer), dtype=module.dtype
        )
        return jax.tree.map(
            lambda s, n: lax.dynamic_update_index_in_dim(s, n.astype(s.dtype), layer, 0),
            stack,
            new,
        )

    return jax.jit(write, donate_argnums=0)
