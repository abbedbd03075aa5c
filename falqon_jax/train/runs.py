"""Load a model for inference from wherever it lives: a training run, one of its
checkpoints, a Hugging Face checkpoint, an FP8 export, or a model card.

A training run (``python -m falqon_jax.train --out OUT``) keeps its settings in
``OUT/config.json``, Orbax checkpoints of what training changes in ``OUT/checkpoints/<step>/``
and the frozen rest of the model in ``OUT/frozen/``. :func:`load_run` rebuilds the run's
model (architecture from ``config.model``: a Hugging Face directory, a Hub model's config in
the Hugging Face cache, or a model card; the linear methods, rank, alpha and targets from
the run) without converting any weights, then fills it with the checkpoint's params.
:func:`restore` gives the params alone, as plain nested dicts (for other trainers). Both read
through :func:`falqon_jax.train.checkpoints.read_checkpoint`, which proves the checkpoint and
``OUT/frozen`` against their fingerprints as ``--resume`` does.

:func:`load_any` picks the right loader for a path or name, for the ``generate`` and
``export`` command-line tools.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from falqon_jax import rules
from falqon_jax.model.config import LlamaConfig, load_card
from falqon_jax.model.llama import Llama, LlamaModel, abstract_params, plan_linears
from falqon_jax.model.loading import DTYPES, LoadError
from falqon_jax.tree_paths import path_names

CHECKPOINTS = "checkpoints"


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
        values |= {"rule": rules.PAPER.name, "a_scale": "natural"}
    for key, value in values.items():  # targets, report_to: tuples, saved as lists
        if isinstance(value, list):
            values[key] = tuple(value)
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
    """The params of the checkpoint ``step_dir`` (``OUT/checkpoints/N``) in ``module``'s
    parameter structure and dtypes, on the first device: the step's changing params and the
    run's frozen ones (``OUT/frozen``), both proven against their fingerprints
    (:func:`falqon_jax.train.checkpoints.read_checkpoint`; the step's optimizer state is
    read for that too). Raises :class:`~falqon_jax.train.checkpoints.CheckpointError` for a
    damaged checkpoint and :class:`LoadError` for one that does not fit ``module``.
    """
    from falqon_jax.train.checkpoints import read_checkpoint

    return fit_params(read_checkpoint(step_dir).params, module, step_dir)


def fit_params(saved: dict[str, Any], module: Llama, step_dir: Path) -> Any:
    """``saved`` (nested dicts of path names, as :func:`restore` gives them) in ``module``'s
    parameter structure, cast to its dtypes; leaves ``module`` does not have are dropped.
    Raises :class:`LoadError` for a leaf missing or of another shape."""

    def take(path: tuple[Any, ...], want: jax.ShapeDtypeStruct) -> jax.Array:
        node: Any = saved
        for name in path_names(path):
            if not isinstance(node, dict) or name not in node:
                raise LoadError(f"checkpoint {step_dir} does not fit the run's model (it lacks "
                                f"params{jax.tree_util.keystr(path)})")
            node = node[name]
        if tuple(node.shape) != tuple(want.shape):
            raise LoadError(
                f"checkpoint {step_dir} does not fit the run's model "
                f"(params{jax.tree_util.keystr(path)} of shape {tuple(node.shape)} is not "
                f"compatible with the model's {tuple(want.shape)})")
        return node if node.dtype == want.dtype else node.astype(want.dtype)

    return jax.tree_util.tree_map_with_path(take, abstract_params(module))


def resolve_checkpoint(
    path: str | os.PathLike[str], step: int | None = None
) -> tuple[Path, Path]:
    """``(run_dir, step_dir)`` for a run directory (its checkpoint of ``step``, default the
    latest) or a step directory (``step``, if given, must be its).

    Raises :class:`LoadError` for anything else, saying what the path is instead.
    """
    p = Path(path)
    if p.name == CHECKPOINTS and is_run_config(read_json(p.parent / "config.json")):
        p = p.parent  # OUT/checkpoints means the run
    if is_checkpoint_dir(p):
        run_dir = p.parent.parent
        if not is_run_config(read_json(run_dir / "config.json")):
            raise LoadError(f"{p} is a checkpoint but {run_dir}/config.json is missing")
        if step is not None and int(p.name) != step:
            raise LoadError(f"{p} is the checkpoint of step {p.name}, not of step {step}")
        return run_dir, p
    config = read_json(p / "config.json")
    if is_run_config(config):
        steps = checkpoint_steps(p)
        if not steps:
            raise LoadError(f"{p} is a training run without checkpoints (none saved yet)")
        if step is not None and step not in steps:
            raise LoadError(f"{p} has no checkpoint of step {step} (it has steps "
                            f"{', '.join(map(str, steps))})")
        return p, p / CHECKPOINTS / str(steps[-1] if step is None else step)
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
      CheckpointError: the checkpoint or ``OUT/frozen`` is damaged (unreadable, or its
        arrays differ from their fingerprint); one line naming it and what to do.
    """
    if dtype is not None and dtype not in DTYPES:
        raise LoadError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    run_dir, step_dir = resolve_checkpoint(path)
    config = read_run_config(run_dir)
    module = run_module(config, dtype)
    return LlamaModel(module, restore_params(step_dir, module)), config


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """A run's trained params and settings, as :func:`restore` gives them.

    ``params``: nested dicts of ``jax.Array`` (see :func:`restore` for the layout);
    ``config``: the run's :class:`~falqon_jax.train.config.TrainConfig`; ``step``: the
    checkpoint's step; ``checkpoint``: its directory, ``OUT/checkpoints/STEP``.
    """

    params: dict[str, Any]
    config: Any
    step: int
    checkpoint: Path


def restore(path: str | os.PathLike[str], step: int | None = None) -> RestoredRun:
    """The trained params of a run, for any JAX code: no model is built, nothing converted.

    Args:
      path: the run's ``--out`` directory, ``OUT`` (with ``step``: that checkpoint, else the
        latest), or one checkpoint, ``OUT/checkpoints/STEP``.
      step: the step of the checkpoint to read (default: ``path``'s, or the latest).

    The step's checkpoint (what training changes) and ``OUT/frozen`` (the rest, written once
    per run) are merged, after both are proven bit for bit against the fingerprints the
    checkpoint recorded, as ``--resume`` proves them (the step's optimizer state is read for
    that too). Checkpoints of the earlier layout hold every param and have no fingerprints.

    Returns:
      :class:`RestoredRun`. ``params`` is the Flax params tree of the run's
      :class:`~falqon_jax.model.llama.Llama` as plain nested dicts of ``jax.Array`` on the
      first device, bit for bit as trained (``jax.device_put`` places them elsewhere,
      ``numpy.asarray`` copies them to the host). With ``L`` decoder layers, hidden size
      ``H`` and vocabulary ``V``; ``dtype`` is the run's ``--dtype``::

        embed_tokens                     (V, H) dtype
        layers/input_layernorm/weight    (L, H) float32; also post_attention_layernorm
        layers/self_attn/{q,k,v,o}_proj  a linear layer, stacked: leading axis L
        layers/mlp/{gate,up,down}_proj   a linear layer, stacked: leading axis L
        norm/weight                      (H,) float32
        lm_head                          a linear layer (absent: tied to embed_tokens)

      A linear layer ``y = x W^T`` with ``W`` of shape ``(out, in)``, by ``config.method``
      (``r = config.rank``; layers left unconverted, and ``full``, are ``w``):

      * ``falqon``: ``w8`` float8_e4m3fn ``(L, out + r, in)``, the melded ``[W; A]``: rows
        ``[:out]`` are ``W``, rows ``[out:]`` the frozen LoRA factor ``A``, both
        ``w8.astype(float32) * scale``; ``scale`` float32 ``(L,)``; ``b`` float32
        ``(L, out, r)``. The layer computes ``x W^T + (A x) b^T`` (the live rules, the
        default ``visible``); under ``paper``/``reference`` ``b`` is zero.
      * ``lora``: ``w`` dtype ``(L, out, in)``, ``a`` float32 ``(L, r, in)``, ``b`` float32
        ``(L, out, r)``; ``y = x W^T + (alpha / r) (x a^T) b^T``.
      * ``fp8_lora``: ``w8`` float8_e4m3fn ``(L, out, in)`` and ``scale`` float32 ``(L,)``
        (``W = w8 * scale``), ``a`` and ``b`` as for ``lora``.
      * ``qlora``: ``w`` the NF4 weight (``codes``, ``absmax_q``, ``absmax_scale``,
        ``absmax_offset``: :class:`falqon_jax.baselines.nf4.NF4Tensor`), ``a``, ``b`` as
        for ``lora``.
      * ``w``: dtype ``(L, out, in)``.

      ``lm_head`` has no ``L`` axis (``(V, H)`` weight: ``out = V``, ``in = H``).

    Raises:
      LoadError: ``path`` is not a run or one of its checkpoints, or ``step`` is not saved.
      CheckpointError: the checkpoint or ``OUT/frozen`` cannot be read or differs from its
        fingerprint (one line naming it and what to do).
    """
    from falqon_jax.train.checkpoints import read_checkpoint

    run_dir, step_dir = resolve_checkpoint(path, step)
    config = read_run_config(run_dir)
    saved = read_checkpoint(step_dir)
    return RestoredRun(saved.params, config, saved.step, step_dir)
