"""Load a model for inference from wherever it lives: a training run, one of its
checkpoints, a Hugging Face checkpoint, an FP8 export, or a model card.

A training run (``python -m falqon_jax.train --out OUT``) keeps its settings in
``OUT/config.json`` and Orbax checkpoints in ``OUT/checkpoints/<step>/``. :func:`load_run`
rebuilds the run's model (architecture from ``config.model``: a model card or a Hugging
Face directory; the linear methods, rank, alpha and targets from the run) without
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

from falqon_jax.config import LlamaConfig, load_card
from falqon_jax.llama import Llama, LlamaModel, abstract_params, plan_linears

CHECKPOINTS = "checkpoints"
_DTYPES = ("bfloat16", "float32")


class LoadError(ValueError):
    """A path or setting that cannot be loaded; the message is one line saying why."""


# --------------------------------------------------------------------------------------
# Recognising what a path holds.


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_run_config(data: dict[str, Any] | None) -> bool:
    """Whether a parsed ``config.json`` is a training run's (not a Hugging Face model's)."""
    return data is not None and "model_type" not in data and {"model", "method"} <= data.keys()


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Saved steps under ``run_dir/checkpoints``, ascending (complete checkpoints only)."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(
        int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "state").is_dir()
    )


def kind_of(path: str | os.PathLike[str]) -> str:
    """What ``path`` is: ``"run"``, ``"checkpoint"`` (``OUT/checkpoints/N``), ``"fp8"`` (an
    FP8 export), ``"hf"`` (a Hugging Face checkpoint), ``"card"`` (a name that is not a
    path) or ``"missing"``/``"unknown"``."""
    p = Path(path)
    if not p.exists():
        return "missing" if os.sep in str(path) or "/" in str(path) else "card"
    if not p.is_dir():
        return "unknown"
    if p.name.isdigit() and p.parent.name == CHECKPOINTS and (p / "state").is_dir():
        return "checkpoint"
    if p.name == CHECKPOINTS and is_run_config(_read_json(p.parent / "config.json")):
        return "run"
    config = _read_json(p / "config.json")
    if is_run_config(config):
        return "run"
    if config is not None and "model_type" in config:
        quant = config.get("quantization_config") or {}
        return "fp8" if quant.get("quant_method") == "compressed-tensors" else "hf"
    return "unknown"


# --------------------------------------------------------------------------------------
# Training runs.


def read_run_config(run_dir: Path) -> Any:
    """The run's :class:`~falqon_jax.train_config.TrainConfig` from ``run_dir/config.json``.

    Keys the current ``TrainConfig`` does not know are ignored (runs from other versions).
    A FALQON run saved before update rules existed trained with the paper's rule and
    natural-scale ``A``, so its missing ``rule``/``a_scale`` read as those.
    """
    from falqon_jax.train_config import TrainConfig

    data = _read_json(run_dir / "config.json")
    if not is_run_config(data):
        raise LoadError(f"{run_dir}/config.json is missing or not a training run's settings")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in data.items() if k in fields}
    if "rule" not in data:
        values |= {"rule": "paper", "a_scale": "natural"}
    if isinstance(values.get("targets"), list):
        values["targets"] = tuple(values["targets"])
    return TrainConfig(**values)


def _architecture(model: str) -> LlamaConfig:
    """The :class:`LlamaConfig` named by a run's ``model`` setting (card or HF directory)."""
    if not Path(model).is_dir() and (os.sep in model or "/" in model):
        raise LoadError(
            f"the run's model {model} no longer exists; its config.json gives the architecture"
        )
    try:
        return LlamaConfig.from_hf(model) if Path(model).is_dir() else load_card(model)
    except ValueError as err:
        raise LoadError(str(err).splitlines()[0]) from None


def run_module(config: Any, dtype: str | None = None) -> Llama:
    """The (unconverted) :class:`Llama` module a run trained, in ``dtype`` (default: the run's).

    Uses the run's method, rank, alpha and targets; FALQON's random-``A`` ablation has the
    same parameter structure as FALQON.
    """
    arch = _architecture(config.model)
    from falqon_jax.methods import linear_method

    method = linear_method(config)
    with warnings.catch_warnings():  # the run already reported unconverted layers
        warnings.simplefilter("ignore", UserWarning)
        plan = plan_linears(arch, method, targets=config.targets, rank=config.rank,
                            alpha=config.alpha)
    return Llama(arch, plan, jnp.dtype(dtype or config.dtype))


def restore_params(step_dir: Path, module: Llama) -> Any:
    """The ``params`` of the train state saved in ``step_dir`` (``OUT/checkpoints/N``).

    Restores onto ``module``'s parameter structure (casting to its dtypes) on the first
    device. Only the params are read where Orbax supports partial restores.
    """
    import orbax.checkpoint as ocp

    abstract = abstract_params(module)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": abstract}
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=device, dtype=s.dtype), target
    )
    state_dir = (step_dir / "state").resolve()
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns about metadata it does not need here
    try:
        try:
            args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                          partial_restore=True)
        except TypeError:  # older Orbax: no partial restores, read the whole state
            return _restore_all(ocp, state_dir, abstract, device)
        restored = ocp.PyTreeCheckpointer().restore(state_dir, args=args)["params"]
    except (ValueError, KeyError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(
            f"checkpoint {step_dir} does not fit the run's model ({message.split('. ')[0]})"
        ) from None
    finally:
        absl_logger.setLevel(level)
    # A partial restore leaves leaves the checkpoint lacks as they were: abstract.
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
        if not isinstance(leaf, jax.Array):
            raise LoadError(
                f"checkpoint {step_dir} does not fit the run's model (it lacks "
                f"params{jax.tree_util.keystr(path)})"
            )
    return restored


def _restore_all(ocp: Any, state_dir: Path, abstract: Any, device: Any) -> Any:
    """Fallback: restore the whole saved state as nested dicts, then pick out the params."""
    with warnings.catch_warnings():  # "sharding info not provided": one device is the aim
        warnings.simplefilter("ignore", UserWarning)
        saved = ocp.PyTreeCheckpointer().restore(state_dir)["params"]

    def pick(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        node = saved
        for entry in path:
            node = node[getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", None)))]
        return jax.device_put(jnp.asarray(node, leaf.dtype), device)

    return jax.tree_util.tree_map_with_path(pick, abstract)


def resolve_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(run_dir, step_dir)`` for a run directory (its latest checkpoint) or a step directory.

    Raises :class:`LoadError` for anything else, saying what the path is instead.
    """
    p = Path(path)
    if p.name == CHECKPOINTS and is_run_config(_read_json(p.parent / "config.json")):
        p = p.parent  # OUT/checkpoints means the run
    kind = kind_of(p)
    if kind == "checkpoint":
        run_dir = p.parent.parent
        if not is_run_config(_read_json(run_dir / "config.json")):
            raise LoadError(f"{p} is a checkpoint but {run_dir}/config.json is missing")
        return run_dir, p
    if kind == "run":
        steps = checkpoint_steps(p)
        if not steps:
            raise LoadError(f"{p} is a training run without checkpoints (none saved yet)")
        return p, p / CHECKPOINTS / str(steps[-1])
    if not p.exists():
        raise LoadError(f"{p} does not exist")
    if kind in ("hf", "fp8"):
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
      bit-for-bit as trained) and the run's :class:`~falqon_jax.train_config.TrainConfig`.

    Raises:
      LoadError: a path that is neither, a run without checkpoints, a model that no longer
        exists, or a checkpoint that does not match the run's settings.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise LoadError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    run_dir, step_dir = resolve_checkpoint(path)
    config = read_run_config(run_dir)
    module = run_module(config, dtype)
    return LlamaModel(module, restore_params(step_dir, module)), config


# --------------------------------------------------------------------------------------
# Any source.


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
) -> Loaded:
    """Load ``source``: a run, a run checkpoint, an FP8 export, a Hugging Face directory or
    a model card.

    ``method``/``rank``/``alpha`` convert a Hugging Face directory or card (see
    :func:`falqon_jax.loading.load_model`); runs and FP8 exports bring their own. ``dtype``
    defaults to the run's, else ``"bfloat16"``. ``init="random"`` is needed for a card.
    Raises :class:`LoadError` with a one-line message for anything unusable.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise LoadError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    kind = kind_of(source)
    path = Path(source)
    if kind in ("run", "checkpoint"):
        model, config = load_run(path, dtype=dtype)
        tok = config.tokenizer or (config.model if Path(config.model).is_dir() else None)
        tok_dir = Path(tok) if tok is not None and _has_tokenizer(Path(tok)) else None
        return Loaded(model, kind, tok_dir, config)
    if kind == "missing":
        raise LoadError(f"{source} does not exist")
    if kind == "unknown":
        raise LoadError(
            f"{source} is not a training run, run checkpoint, Hugging Face checkpoint or "
            "FP8 export"
        )
    try:
        if kind == "fp8":
            from falqon_jax.export import load_fp8_export

            model = load_fp8_export(path, dtype=dtype or "bfloat16", seed=seed)
        else:
            from falqon_jax.loading import load_model

            model = load_model(source, method=method, rank=rank, alpha=alpha,
                               dtype=dtype or "bfloat16", init=init, seed=seed)
    except (ValueError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(message) from None
    tok_dir = path if kind in ("hf", "fp8") and _has_tokenizer(path) else None
    return Loaded(model, kind, tok_dir)
