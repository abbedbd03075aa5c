"""Load a model for inference from wherever it lives: a training run, one of its
checkpoints, a Hugging Face checkpoint, an FP8 export, or a model card.

A training run (``python -m falqon_jax.train --out OUT``) keeps its settings in
``OUT/config.json``, Orbax checkpoints of what training changes in ``OUT/checkpoints/<step>/``
and the frozen rest of the model in ``OUT/frozen/``. :func:`load_run` rebuilds the run's
model (architecture from ``config.model``: a Hugging Face directory, a Hub model's config in
the Hugging Face cache, or a model card; the linear methods, rank, alpha and targets from
the run) without
converting any weights, then restores only the ``params`` of the checkpoint's train state,
so optimizer moments and FALQON proxy buffers are never read.

:func:`load_any` picks the right loader for a path or name, for the ``generate`` and
``export`` command-line tools.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from falqon_jax.model.config import LlamaConfig, load_card
from falqon_jax.model.llama import Llama, LlamaModel, abstract_params, plan_linears
from falqon_jax.model.loading import DTYPES, LoadError

CHECKPOINTS = "checkpoints"
FROZEN = "frozen"  # = falqon_jax.train.checkpoints.FROZEN


# --------------------------------------------------------------------------------------
# Recognising what a path holds.


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_run_config(data: dict[str, Any] | None) -> bool:
    """Whether a parsed ``config.json`` is a training run's (not a Hugging Face model's)."""
    return data is not None and "model_type" not in data and {"model", "method"} <= data.keys()


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` is one saved step of a run, ``OUT/checkpoints/STEP``."""
    return path.name.isdigit() and path.parent.name == CHECKPOINTS and (path / "state").is_dir()


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Saved steps under ``run_dir/checkpoints``, ascending (complete checkpoints only)."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(
        int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "state").is_dir()
    )


# --------------------------------------------------------------------------------------
# Training runs.


def read_run_config(run_dir: Path) -> Any:
    """The run's :class:`~falqon_jax.train.config.TrainConfig` from ``run_dir/config.json``.

    Keys the current ``TrainConfig`` does not know are ignored (runs from other versions).
    A FALQON run saved before update rules existed trained with the paper's rule and
    natural-scale ``A``, so its missing ``rule``/``a_scale`` read as those.
    """
    from falqon_jax.train.config import TrainConfig

    data = read_json(run_dir / "config.json")
    if not is_run_config(data):
        raise LoadError(f"{run_dir}/config.json is missing or not a training run's settings")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in data.items() if k in fields}
    if "rule" not in data:
        values |= {"rule": "paper", "a_scale": "natural"}
    if isinstance(values.get("targets"), list):
        values["targets"] = tuple(values["targets"])
    return TrainConfig(**values)


def _architecture(config: Any) -> LlamaConfig:
    """The :class:`LlamaConfig` of a run's model: its checkpoint's ``config.json`` (a local
    directory, or a Hub model's or card source's, from the Hugging Face cache), or the card
    for a card trained from random weights."""
    from falqon_jax.model.resolve import classify, model_directory

    model = config.model
    kind = classify(model)
    if kind in ("missing", "file"):
        raise LoadError(
            f"the run's model {model} no longer exists; its config.json gives the architecture"
        )
    try:
        if kind == "card" and config.init == "random":
            return load_card(model)
        return LlamaConfig.from_hf(model_directory(model, weights=False))
    except ValueError as err:
        raise LoadError(str(err).splitlines()[0]) from None


def run_module(config: Any, dtype: str | None = None) -> Llama:
    """The (unconverted) :class:`Llama` module a run trained, in ``dtype`` (default: the run's).

    Uses the run's method, rank, alpha and targets; FALQON's random-``A`` ablation has the
    same parameter structure as FALQON.
    """
    arch = _architecture(config)
    from falqon_jax.model.methods import linear_method

    method = linear_method(config)
    with warnings.catch_warnings():  # the run already reported unconverted layers
        warnings.simplefilter("ignore", UserWarning)
        plan = plan_linears(arch, method, targets=config.targets, rank=config.rank,
                            alpha=config.alpha)
    return Llama(arch, plan, jnp.dtype(dtype or config.dtype))


def restore_params(step_dir: Path, module: Llama) -> Any:
    """The ``params`` of the train state saved in ``step_dir`` (``OUT/checkpoints/N``).

    Restores onto ``module``'s parameter structure (casting to its dtypes) on the first
    device: the changing params from the step's ``state``, the frozen rest from the run's
    ``OUT/frozen/state`` (written once per run; checkpoints of older versions hold every
    param themselves). Only the params are read where Orbax supports partial restores.
    """
    import orbax.checkpoint as ocp

    abstract = abstract_params(module)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = abstract
    frozen_dir = step_dir.parent.parent / FROZEN / "state"
    for state_dir in (step_dir / "state", frozen_dir):
        if not _missing(params) or not state_dir.is_dir():
            continue
        part = _restore_part(ocp, state_dir.resolve(), abstract, device, step_dir)
        params = jax.tree.map(lambda have, new: have if isinstance(have, jax.Array) else new,
                              params, part)
    for path in _missing(params):
        raise LoadError(
            f"checkpoint {step_dir} does not fit the run's model (it lacks "
            f"params{jax.tree_util.keystr(path)})"
        )
    return params


def _missing(params: Any) -> list[Any]:
    """Paths of the leaves not restored yet (still abstract)."""
    return [path for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if not isinstance(leaf, jax.Array)]


def _restore_part(ocp: Any, state_dir: Path, abstract: Any, device: Any, step_dir: Path) -> Any:
    """The params saved in ``state_dir``; leaves it lacks stay as in ``abstract``."""
    target = {"params": abstract}
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=device, dtype=s.dtype), target
    )
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns about metadata it does not need here
    try:
        try:
            args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                          partial_restore=True)
        except TypeError:  # older Orbax: no partial restores, read the whole state
            return _restore_all(ocp, state_dir, abstract, device)
        # A partial restore leaves leaves the checkpoint lacks as they were: abstract.
        return ocp.PyTreeCheckpointer().restore(state_dir, args=args)["params"]
    except (ValueError, KeyError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(
            f"checkpoint {step_dir} does not fit the run's model ({message.split('. ')[0]})"
        ) from None
    finally:
        absl_logger.setLevel(level)


def _restore_all(ocp: Any, state_dir: Path, abstract: Any, device: Any) -> Any:
    """Fallback: restore the whole saved state as nested dicts, then pick out the params
    (leaves the checkpoint lacks stay as in ``abstract``)."""
    with warnings.catch_warnings():  # "sharding info not provided": one device is the aim
        warnings.simplefilter("ignore", UserWarning)
        saved = ocp.PyTreeCheckpointer().restore(state_dir)["params"]

    def pick(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> Any:
        node = saved
        for entry in path:
            key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", None)))
            if not isinstance(node, dict) or key not in node or node[key] is None:
                return leaf
            node = node[key]
        return jax.device_put(jnp.asarray(node, leaf.dtype), device)

    return jax.tree_util.tree_map_with_path(pick, abstract)


def resolve_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(run_dir, step_dir)`` for a run directory (its latest checkpoint) or a step directory.

    Raises :class:`LoadError` for anything else, saying what the path is instead.
    """
    p = Path(path)
    if p.name == CHECKPOINTS and is_run_config(read_json(p.parent / "config.json")):
        p = p.parent  # OUT/checkpoints means the run
    if is_checkpoint_dir(p):
        run_dir = p.parent.parent
        if not is_run_config(read_json(run_dir / "config.json")):
            raise LoadError(f"{p} is a checkpoint but {run_dir}/config.json is missing")
        return run_dir, p
    config = read_json(p / "config.json")
    if is_run_config(config):
        steps = checkpoint_steps(p)
        if not steps:
            raise LoadError(f"{p} is a training run without checkpoints (none saved yet)")
        return p, p / CHECKPOINTS / str(steps[-1])
    if not p.exists():
        raise LoadError(f"{p} does not exist")
    if "model_type" in (config or {}):
        raise LoadError(f"{p} is a model checkpoint, not a training run or run checkpoint")
    raise LoadError(
        f"{p} is neither a training run (OUT with config.json and checkpoints/) nor a "
        "run checkpoint (OUT/checkpoints/STEP)"
    )


def load_run(
    path: str | os.PathLike[str], *, dtype: str | None = None
) -> tuple[LlamaModel, Any]:
    """Load the model of a training run.

    Args:
      path: a run's output directory (its latest checkpoint is used) or one of its
        checkpoints, ``OUT/checkpoints/STEP``.
      dtype: compute dtype (``"bfloat16"``/``"float32"``); default: the run's.

    Returns:
      ``(model, config)``: a :class:`LlamaModel` with the checkpoint's params (FP8 weights
      bit-for-bit as trained) and the run's :class:`~falqon_jax.train.config.TrainConfig`.

    Raises:
      LoadError: a path that is neither, a run without checkpoints, a model that no longer
        exists, or a checkpoint that does not match the run's settings.
    """
    if dtype is not None and dtype not in DTYPES:
        raise LoadError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    run_dir, step_dir = resolve_checkpoint(path)
    config = read_run_config(run_dir)
    module = run_module(config, dtype)
    return LlamaModel(module, restore_params(step_dir, module)), config
