"""Load a model for inference from wherever it lives: a training run, one of its
checkpoints, a Hugging Face checkpoint (a directory or a Hub name), an FP8 export, or a model
card.

:func:`kind_of` tells what a path holds and :func:`load_any` picks the loader for it (for
the ``generate`` and ``export`` command-line tools): :func:`falqon_jax.train.runs.load_run`
for runs, :func:`falqon_jax.export.load_fp8_export` for FP8 exports and
:func:`falqon_jax.load_model` for Hugging Face checkpoints and model cards.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from falqon_jax.model.llama import LlamaModel
from falqon_jax.model.loading import DTYPES, LoadError
from falqon_jax.model.resolve import classify, model_directory, tokenizer_directory
from falqon_jax.train.runs import (
    CHECKPOINTS,
    is_checkpoint_dir,
    is_run_config,
    load_run,
    read_json,
)

if TYPE_CHECKING:
    from jax.sharding import Mesh


def kind_of(path: str | os.PathLike[str]) -> str:
    """What ``path`` is: ``"run"``, ``"checkpoint"`` (``OUT/checkpoints/N``), ``"fp8"`` (an
    FP8 export), ``"hf"`` (a Hugging Face checkpoint directory), ``"hub"`` (a Hugging Face Hub
    name, ``org/name[@revision]``, that is no local path), ``"card"`` (a name without a
    slash) or ``"missing"``/``"unknown"``."""
    p = Path(path)
    if not p.exists():
        kind = classify(path)
        return kind if kind in ("hub", "card") else "missing"
    if not p.is_dir():
        return "unknown"
    if is_checkpoint_dir(p):
        return "checkpoint"
    if p.name == CHECKPOINTS and is_run_config(read_json(p.parent / "config.json")):
        return "run"
    config = read_json(p / "config.json")
    if is_run_config(config):
        return "run"
    if config is not None and "model_type" in config:
        quant = config.get("quantization_config") or {}
        return "fp8" if quant.get("quant_method") == "compressed-tensors" else "hf"
    return "unknown"


@dataclasses.dataclass
class Loaded:
    """A model plus where it came from.

    ``kind``: as :func:`kind_of`; ``tokenizer_dir``: a directory with Hugging Face
    tokenizer files for it, if known; ``run_config``: the run's settings (runs only).
    """

    model: LlamaModel
    kind: str
    tokenizer_dir: Path | None = None
    run_config: Any = None

    @property
    def demo(self) -> bool:
        """Whether the model was trained on the built-in demo data (character tokenizer)."""
        return self.run_config is not None and getattr(self.run_config, "is_demo", False)


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model",
                                                     "tokenizer_config.json"))


def load_any(
    source: str | os.PathLike[str],
    *,
    method: str = "full",
    rank: int = 64,
    alpha: float = 16.0,
    dtype: str | None = None,
    seed: int = 0,
    init: str | None = None,
    mesh: Mesh | None = None,
) -> Loaded:
    """Load ``source``: a run, a run checkpoint, an FP8 export, a Hugging Face directory, a
    Hugging Face Hub name or a model card.

    ``method``/``rank``/``alpha`` convert a Hugging Face checkpoint or card (see
    :func:`falqon_jax.model.loading.load_model`); runs and FP8 exports bring their own. ``dtype``
    defaults to the run's, else ``"bfloat16"``. A Hub name, or a card's Hub ``source``, is
    downloaded into the Hugging Face cache (or read from it offline); ``init="random"`` gives
    random weights instead (a card's architecture; a Hub model's from its config alone).
    ``mesh``: the params come back split over it as a training run's
    (:func:`falqon_jax.sharding.tree_shardings`); a Hugging Face checkpoint or card is
    converted straight onto it, layer by layer (no device ever holds the whole model), a run
    or an FP8 export is read, then placed.
    Raises :class:`LoadError` with a one-line message for anything unusable, and
    :class:`~falqon_jax.train.checkpoints.CheckpointError` (one line) for a run's checkpoint
    or ``OUT/frozen`` that cannot be read or differs from its fingerprint.
    """
    if dtype is not None and dtype not in DTYPES:
        raise LoadError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    kind = kind_of(source)
    path = Path(source)
    if kind in ("run", "checkpoint"):
        model, config = load_run(path, dtype=dtype)
        return Loaded(_placed(model, mesh), kind, _run_tokenizer(config), config)
    if kind == "missing":
        raise LoadError(f"{source} does not exist")
    if kind == "unknown":
        raise LoadError(
            f"{source} is not a training run, run checkpoint, Hugging Face checkpoint or "
            "FP8 export"
        )
    try:
        if kind in ("hub", "card") and not (kind == "card" and init == "random"):
            path = model_directory(source, weights=init != "random")  # download once, here
            kind = "hub"
        if kind == "fp8":
            from falqon_jax.export.reader import load_fp8_export

            model = _placed(load_fp8_export(path, dtype=dtype or "bfloat16", seed=seed), mesh)
        else:
            from falqon_jax.model.loading import load_model

            model = load_model(path if kind == "hub" else source, method=method, rank=rank,
                               alpha=alpha, dtype=dtype or "bfloat16", init=init, seed=seed,
                               mesh=mesh)
    except (ValueError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(message) from None
    tok_dir = path if kind in ("hf", "fp8", "hub") and _has_tokenizer(path) else None
    return Loaded(model, kind, tok_dir)


def _placed(model: LlamaModel, mesh: Mesh | None) -> LlamaModel:
    """``model`` with its params split over ``mesh`` as a training run's."""
    if mesh is None:
        return model
    import jax

    from falqon_jax.sharding import tree_shardings

    params = jax.device_put(model.params, tree_shardings(mesh, model.params))
    return LlamaModel(model.module, params)


def _run_tokenizer(config: Any) -> Path | None:
    """The directory of a run's Hugging Face tokenizer (its ``--tokenizer`` or model's: a
    directory, or a Hub model's files in the cache), if it has one."""
    if config.is_demo or config.tokenizer == "char" \
            or classify(config.tokenizer_source) in ("missing", "file"):
        return None
    try:
        directory = tokenizer_directory(config.tokenizer_source)
    except ValueError as err:
        raise LoadError(str(err).splitlines()[0]) from None
    return directory if directory is not None and _has_tokenizer(directory) else None
