"""Build a :class:`~falqon_jax.model.llama.LlamaModel` from a Hugging Face checkpoint (a local
directory or a Hub name) or a model card.

Checkpoints are read with ``safetensors`` one tensor at a time and converted layer by
layer (on the accelerator, where there is one) into preallocated stacked device arrays, so
device memory holds the converted model plus one layer in flight (a 7B LLaMA in bfloat16:
~14 GiB, not ~40) and host memory one tensor plus one layer, whatever the model's size.
Given a mesh, every array is created already split over its devices (``load_model(...,
mesh=...)``): a 70B model loads onto 8 GPUs without ever being whole on one.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 & float8 with numpy, for safetensors)
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open
from tqdm import tqdm

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
from falqon_jax.sharding import replicated, tree_shardings

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
    mesh: Mesh | None = None,
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
      mesh: every param created already split over this mesh as the trainer keeps it
        (:func:`falqon_jax.sharding.tree_shardings`; see :func:`convert_params`); default:
        everything on the default device.

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
        params = random_params(module, seed, mesh=mesh)
    else:
        params = load_params(source, module, jax.random.key(seed), mesh=mesh)
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
    """Tensor-by-tensor access to a (possibly sharded) safetensors checkpoint.

    Each read opens its file and closes it again: ``safe_open`` memory-maps the file, and
    the pages a read touches stay in the process's resident memory while the map is open,
    so a checkpoint kept open would count every tensor read so far (the whole model by the
    end of a load) against the host's memory.
    """

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="numpy") as handle:
                for name in handle.keys():
                    self._where[name] = path

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor ``name`` as float32, checked against ``shape``."""
        if name not in self._where:
            raise ValueError(f"checkpoint lacks tensor {name!r}")
        with safe_open(str(self._where[name]), framework="numpy") as handle:
            array = handle.get_tensor(name)
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


def load_params(directory: Path, module: Llama, key: jax.Array, *, mesh: Mesh | None = None,
                on_layer: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Read a Hugging Face LLaMA checkpoint and convert it into ``module``'s params pytree.

    ``key`` seeds methods that draw random factors. See :func:`convert_params`.
    """
    return convert_params(_Checkpoint(weight_files(directory)), module, key, mesh=mesh,
                          on_layer=on_layer)


def random_params(module: Llama, seed: int = 0, *, mesh: Mesh | None = None) -> dict[str, Any]:
    """Random ``N(0, 0.02)`` weights (unit norms) converted into ``module``'s params pytree.

    Streams like a checkpoint load, so it also works for models too big to build in float.
    """
    return convert_params(_RandomWeights(seed), module, jax.random.key(seed), mesh=mesh)


def convert_params(source: Any, module: Llama, key: jax.Array, *, mesh: Mesh | None = None,
                   on_layer: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Convert Hugging Face-named float weights into ``module``'s params pytree, streaming.

    ``source.read(name, shape)`` returns one float32 host tensor (HF layout, linear weights
    ``(out, in)``). The stacked layer params are preallocated; each weight is converted by
    its layer's method on one device and written into slot ``i`` by a jitted call that
    donates the stack, so memory holds the converted model plus one layer in flight.

    Without ``mesh`` every array lives on the default device. With one, every array is
    created already split over ``mesh`` by :func:`falqon_jax.sharding.tree_shardings` (the
    layout the trainer keeps the params in): each device holds its share of the model, the
    device that converts also one layer in flight. ``on_layer(i)`` is called once layer
    ``i`` is written (the progress bar uses the same steps).
    """
    config, plan = module.config, module.plan
    place = _Placement(abstract_params(module), mesh)
    embed_shape = (config.vocab_size, config.hidden_size)
    embed_name = "model.embed_tokens.weight"
    params: dict[str, Any] = {
        "embed_tokens": place.host(source.read(embed_name, embed_shape), module.dtype,
                                   ("embed_tokens",)),
        "norm": {"weight": place.host(source.read("model.norm.weight", (config.hidden_size,)),
                                      jnp.float32, ("norm", "weight"))},
        "layers": _convert_layers(source, module, key, place, on_layer),
    }
    if "lm_head" in place.abstract:
        w = source.read(embed_name if config.tie_word_embeddings else "lm_head.weight", embed_shape)
        method = plan.method("lm_head")
        convert = _converter(method, plan.rank, plan.alpha, module.dtype, per_layer=False)
        params["lm_head"] = place.converted(convert(*place.inputs(w, _target_key(key, "lm_head"))),
                                            ("lm_head",))
    if jax.tree.structure(params) != jax.tree.structure(place.abstract):
        raise ValueError("converted params do not match the model's parameter structure")
    return params


def _target_key(key: jax.Array, target: str) -> jax.Array:
    return jax.random.fold_in(key, ALL_TARGETS.index(target))


def _convert_layers(source: Any, module: Llama, key: jax.Array, place: _Placement,
                    on_layer: Callable[[int], None] | None) -> dict[str, Any]:
    """The decoder layers' params: stacks ``(num_layers, ...)`` filled one layer at a time."""
    config, plan = module.config, module.plan
    hidden = (config.hidden_size,)
    shapes = linear_shapes(config)
    norms = {name: np.empty((config.num_layers, *hidden), np.float32) for name in _HF_NORMS}
    stacks = {target: place.zeros(("layers", *path)) for target, path in _LAYER_PATHS.items()}
    convert = {target: _converter(plan.method(target), plan.rank, plan.alpha, module.dtype,
                                  per_layer=True) for target in _HF_LINEARS}
    write = {target: place.writer(("layers", *path)) for target, path in _LAYER_PATHS.items()}
    for i in _layer_progress(config):
        prefix = f"model.layers.{i}."
        for name in _HF_NORMS:
            norms[name][i] = source.read(f"{prefix}{name}.weight", hidden)
        for target, hf_name in _HF_LINEARS.items():
            w = source.read(f"{prefix}{hf_name}.weight", shapes[target])
            new = convert[target](*place.inputs(w, _target_key(key, target), np.int32(i)))
            slot = place.converted(new, ("layers", *_LAYER_PATHS[target]), stacked=True)
            del new  # one layer in flight
            stacks[target] = write[target](stacks[target], slot, np.int32(i))
        # the host reads ahead of the device no further than one layer: otherwise the
        # weights of every layer read so far could be queued for conversion at once
        jax.block_until_ready(stacks)
        if on_layer is not None:
            on_layer(i)
    layers: dict[str, Any] = {
        name: {"weight": place.host(norms[name], jnp.float32, ("layers", name, "weight"))}
        for name in _HF_NORMS
    }
    for target, (group, proj) in _LAYER_PATHS.items():
        layers.setdefault(group, {})[proj] = stacks.pop(target)
    return layers


@functools.lru_cache(maxsize=64)
def _converter(method: Any, rank: int, alpha: float, dtype: Any,
               per_layer: bool) -> Callable[..., Any]:
    """``(w, key, i) -> method.init(w)`` with ``key`` folded with layer ``i`` (``per_layer``)
    or ``(w, key) -> method.init(w)`` (jitted; runs where ``w`` is). Kept per method and
    settings, so loading again (another model of the same shapes, ``--init-a grad``'s dense
    copy) compiles nothing again."""

    def convert(w: jax.Array, key: jax.Array, *layer: jax.Array) -> Any:
        if per_layer:
            key = jax.random.fold_in(key, layer[0])
        return method.init(w, rank, alpha=alpha, key=key, dtype=dtype)

    return jax.jit(convert)


def _write_slot(stack: Any, new: Any, layer: jax.Array) -> Any:
    """``stack`` (leaves ``(num_layers, ...)``) with slot ``layer`` set to ``new``."""
    return jax.tree.map(
        lambda s, n: lax.dynamic_update_index_in_dim(s, n.astype(s.dtype), layer, 0), stack, new
    )


class _Placement:
    """Where converted params go: the default device (no ``mesh``), or split over ``mesh`` by
    :func:`falqon_jax.sharding.tree_shardings` with one of the mesh's devices (this
    process's first) converting. ``path`` arguments name a subtree of the params, e.g.
    ``("layers", "mlp", "up_proj")``."""

    def __init__(self, abstract: Any, mesh: Mesh | None) -> None:
        self.abstract = abstract
        self.mesh = mesh
        self.shardings = None if mesh is None else tree_shardings(mesh, abstract)
        self.device = None if mesh is None else next(
            d for d in mesh.devices.flat if d.process_index == jax.process_index())

    def _at(self, tree: Any, path: tuple[str, ...]) -> Any:
        for name in path:
            tree = tree[name]
        return tree

    def zeros(self, path: tuple[str, ...]) -> Any:
        """Zeros shaped like the params at ``path``, created in place (split over the mesh)."""
        abstract = self._at(self.abstract, path)

        def zeros() -> Any:
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)

        if self.mesh is None:
            return zeros()
        return jax.jit(zeros, out_shardings=self._at(self.shardings, path))()

    def host(self, array: np.ndarray, dtype: Any, path: tuple[str, ...]) -> jax.Array:
        """Host ``array`` as a ``dtype`` array at ``path`` (each device gets its slice)."""
        if self.mesh is None:
            return jnp.asarray(array, dtype)
        return jax.make_array_from_callback(
            array.shape, self._at(self.shardings, path),
            lambda index: np.asarray(array[index]).astype(dtype))

    def inputs(self, *arrays: Any) -> tuple[Any, ...]:
        """Arguments for a conversion: on the converting device."""
        return arrays if self.device is None else tuple(jax.device_put(arrays, self.device))

    def converted(self, new: Any, path: tuple[str, ...], *, stacked: bool = False) -> Any:
        """``new`` (one device) split over the mesh as the params at ``path`` are (one slot of
        them: ``stacked``), by way of the host, which works across processes too."""
        if self.mesh is None:
            return new
        on_host = jax.device_get(new)
        shardings = self._at(self.shardings, path)
        if stacked:
            shardings = jax.tree.map(_slot_sharding, shardings)
        return jax.tree.map(
            lambda h, s: jax.make_array_from_callback(h.shape, s, lambda index: h[index]),
            on_host, shardings)

    def writer(self, path: tuple[str, ...]) -> Callable[..., Any]:
        """``(stack, new, i) -> stack`` with slot ``i`` set to ``new`` (jitted, ``stack``
        donated; on a mesh every argument and the result keep the params' layout)."""
        if self.mesh is None:
            return jax.jit(_write_slot, donate_argnums=0)
        stack = self._at(self.shardings, path)
        slot = jax.tree.map(_slot_sharding, stack)
        return jax.jit(_write_slot, donate_argnums=0, out_shardings=stack,
                       in_shardings=(stack, slot, replicated(self.mesh)))


def _slot_sharding(stack: NamedSharding) -> NamedSharding:
    """The sharding of one slot ``stack[i]`` of a stacked leaf (never split on the slots)."""
    return NamedSharding(stack.mesh, PartitionSpec(*tuple(stack.spec)[1:]))


# Models whose decoder projections hold at least this many values show a per-layer progress
# bar while converting (a 7B LLaMA's take minutes; a 135M model's a few seconds).
PROGRESS_MIN_VALUES = 500_000_000


def _layer_progress(config: LlamaConfig) -> Iterable[int]:
    """``range(num_layers)``, with a bar on stderr ("converting layers: 12/80") for big
    models, on the first process; it is cleared once the model is loaded."""
    per_layer = sum(o * i for name, (o, i) in linear_shapes(config).items() if name != "lm_head")
    values = config.num_layers * per_layer
    shown = values >= PROGRESS_MIN_VALUES and jax.process_index() == 0
    return tqdm(range(config.num_layers), desc="converting layers", unit="layer",
                leave=False, file=sys.stderr, disable=not shown, dynamic_ncols=True)
