"""``python -m falqon_jax.eval``: score a model on lm-evaluation-harness tasks (MMLU, ARC,
HellaSwag, ... or your own task YAML files) through the project's own forward and
generation.

``--model`` takes what ``python -m falqon_jax.generate`` takes: a training run (``OUT``: its
latest checkpoint), one checkpoint (``OUT/checkpoints/STEP``), an FP8 export, a Hugging Face
LLaMA checkpoint -- a directory or a Hub name -- (converted with ``--method``/``--rank``,
default ``full``) or a model card. The model is scored as it is: a FALQON run with its FP8
backbone and live ``b``, in the run's dtype unless ``--dtype``. The tokenizer is the
model's (``--tokenizer DIR|NAME`` for one without, ``--tokenizer char`` for the demo's
character tokenizer).

``--tasks`` names lm-eval tasks, groups or tags (``mmlu``; ``arc_easy,arc_challenge``) or
task YAML files; ``--include-path DIR`` adds a folder of your own task YAML files.
``--recipe NAME|FILE.toml`` reads settings from a TOML file (keys are flag names with
underscores; flags override them), e.g. the paper's ``eval-mmlu-5shot`` and
``eval-commonsense-0shot`` shipped with the package.

lm-eval's table goes to stdout, then one summary line. The full results (lm-eval's JSON)
are written to ``OUT/eval/results-<tasks>[-<n>shot][-limit<N>][-step<S>].json`` when the
model is a run, else to ``--output`` (a ``.json`` file, or a directory to put that name in),
which also overrides a run's. Needs the ``eval`` extra (lm-eval); without it, one line
names the install command. Mistakes end with one line on stderr and exit code 2; a run's
damaged checkpoint with one line and exit code 74.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any

from falqon_jax import packaged
from falqon_jax.cli import OneLineParser, one_line_errors
from falqon_jax.eval.harness import EvalError, Settings, split_tasks

CHAR_TOKENIZER = "char"
# Every setting's default; None: not set (the model's, the task's or none).
DEFAULTS: dict[str, Any] = {
    "model": None, "tasks": None, "num_fewshot": None, "limit": None, "batch_size": 16,
    "include_path": None, "output": None, "log_samples": False, "max_length": None,
    "bootstrap_iters": 100000, "tokenizer": None, "dtype": None, "method": "full",
    "rank": 64, "alpha": 16.0, "init": None, "seed": 0, "mesh": None,
}


class UsageError(ValueError):
    """A mistake in the command line; reported as one line."""


def eval_recipes() -> list[str]:
    """The evaluation recipes shipped with the package (``eval-*``)."""
    return [n for n in packaged.names(packaged.recipes_dir()) if n.startswith("eval-")]


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (defaults in :data:`DEFAULTS`; a flag not given is absent)."""
    p = OneLineParser(
        prog="python -m falqon_jax.eval",
        description="Score a training run, run checkpoint, FP8 export, Hugging Face LLaMA "
        "checkpoint (a directory or a Hub name) or model card on lm-evaluation-harness tasks "
        "(needs the eval extra).",
        argument_default=argparse.SUPPRESS,
    )
    add = p.add_argument
    add("--recipe", help="TOML file of settings (keys are flag names with underscores), or "
        f"a shipped evaluation recipe: {', '.join(eval_recipes()) or 'none'}")
    add("--model", help="run directory, OUT/checkpoints/STEP, FP8 export, Hugging Face "
        "directory or Hub name (org/name[@revision]), or model card")
    add("--tasks", help="comma-separated lm-eval tasks, groups or tags (e.g. mmlu, or "
        "arc_easy,arc_challenge), or task YAML files")
    add("--num-fewshot", type=int, help="few-shot examples per prompt (default: each "
        "task's own, else 0)")
    add("--limit", type=float, help="at most this many examples per task (a fraction "
        "below 1: that share of them); for quick checks, not for reported numbers")
    add("--batch-size", type=int, help="rows per forward (default 16)")
    add("--include-path", help="folder of your own task YAML files")
    add("--output", help="results JSON file, or a directory for it (default for a run: "
        "OUT/eval/; otherwise none)")
    add("--log-samples", action="store_true", help="keep every request and response in "
        "the results JSON")
    add("--max-length", type=int, help="longest model input in tokens; longer ones lose "
        "tokens on the left (default: the model's context length)")
    add("--bootstrap-iters", type=int, help="lm-eval's bootstrap iterations for the "
        "standard errors of non-mean metrics (default 100000; 0: none)")
    add("--tokenizer", help="tokenizer directory or Hub name, or 'char' (the demo's) "
        "(default: the model's)")
    add("--dtype", choices=("bfloat16", "float32"),
        help="compute dtype (default: the run's, else bfloat16)")
    add("--method", help="linear method for converting a Hugging Face directory or card "
        "(default full)")
    add("--rank", type=int, help="adapter rank for --method (default 64)")
    add("--alpha", type=float, help="LoRA alpha for --method (default 16)")
    add("--init", choices=("random",), help="random weights (for a model card)")
    add("--seed", type=int, help="seed of random weights and adapter initialisation "
        "(default 0)")
    add("--mesh", help="shard the weights over devices, e.g. fsdp=8 or data=2,fsdp=4 "
        "(default: one device)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for a mistake, 74 for a damaged
    checkpoint or a results file that cannot be written)."""
    given = vars(build_parser().parse_args(argv))
    from falqon_jax.model.loading import LoadError
    from falqon_jax.sharding import MeshError
    from falqon_jax.train.checkpoints import CheckpointError
    from falqon_jax.train.outcome import EXIT_CHECKPOINT

    mistakes = (UsageError, EvalError, LoadError, MeshError)
    return one_line_errors(lambda: run(given), [(mistakes, 2),
                                                (CheckpointError, EXIT_CHECKPOINT)])


# --------------------------------------------------------------------------------------
# Settings: defaults < recipe < flags.


def resolve(given: dict[str, Any]) -> dict[str, Any]:
    """Every setting from the defaults, ``--recipe`` and the flags given; checked."""
    values = dict(DEFAULTS)
    recipe = given.pop("recipe", None)
    if recipe is not None:
        values.update(read_recipe(recipe))
    values.update(given)
    if values["model"] is None:
        raise UsageError("--model is required: a run directory, OUT/checkpoints/STEP, FP8 "
                         "export, Hugging Face directory or Hub name, or model card")
    if not values["tasks"]:
        raise UsageError("--tasks is required: lm-eval task names, e.g. mmlu or "
                         f"arc_easy,arc_challenge (or --recipe {', '.join(eval_recipes())})")
    if values["rank"] <= 0:
        raise UsageError(f"--rank must be positive, got {values['rank']}")
    return values


def settings_of(values: dict[str, Any]) -> Settings:
    settings = Settings(tasks=tuple(split_tasks(values["tasks"])),
                        num_fewshot=values["num_fewshot"], limit=values["limit"],
                        batch_size=values["batch_size"], include_path=values["include_path"],
                        max_length=values["max_length"], log_samples=values["log_samples"],
                        bootstrap_iters=values["bootstrap_iters"])
    settings.check()
    return settings


def read_recipe(name: str) -> dict[str, Any]:
    """The settings of recipe ``name`` (a TOML file, or a shipped recipe by name), each
    checked like its flag: a string goes through the flag's own parsing, other values must
    have its type; ``tasks`` may be a list."""
    from falqon_jax.train.config import ConfigError, recipe_file

    try:
        path = recipe_file(name)
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except ConfigError as err:
        raise UsageError(str(err)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"recipe {name} is not valid TOML: {err}") from None
    actions = {a.dest: a for a in build_parser()._actions if a.dest in DEFAULTS}
    if "data" in raw and "tasks" not in raw:
        raise UsageError(f"recipe {name} is a training recipe (it sets data): run it with "
                         "python -m falqon_jax.train --recipe; evaluation recipes set tasks: "
                         f"{', '.join(eval_recipes())}")
    values = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            raise UsageError(f"recipe {name}: unknown setting '{key}'")
        values[dest] = _recipe_value(name, key, value, actions[dest])
    return values


def _recipe_value(recipe: str, key: str, value: Any, action: argparse.Action) -> Any:
    flag = action.option_strings[0]

    def wrong(expected: str) -> UsageError:
        return UsageError(f"recipe {recipe}: {key} = {value!r} is not valid for {flag}; "
                          f"expected {expected}")

    if action.dest == "tasks":
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return ",".join(value)
        if not isinstance(value, str):
            raise wrong("a list of task names or a comma-separated string")
        return value
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    kind = action.type
    if isinstance(value, str):
        if kind is not None:
            try:
                value = kind(value)
            except ValueError:
                raise wrong("an integer" if kind is int else "a number") from None
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        pass
    elif kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        value = float(value)
    else:
        raise wrong({int: "an integer", float: "a number"}.get(kind, "a string"))
    if action.choices is not None and value not in action.choices:
        raise wrong(f"one of {', '.join(map(str, action.choices))}")
    return value


# --------------------------------------------------------------------------------------
# Running.


def run(given: dict[str, Any]) -> int:
    """Resolve the settings, load the model and tokenizer, evaluate, print and write the
    results. Raises :class:`UsageError`, :class:`EvalError` or ``LoadError`` on mistakes."""
    values = resolve(given)
    settings = settings_of(values)
    from falqon_jax.eval.harness import (
        evaluate,
        require_lm_eval,
        summary,
        table,
        task_manager,
        write_results,
    )

    require_lm_eval()  # before anything is loaded
    from falqon_jax.sharding import optional_mesh
    from falqon_jax.sources import kind_of

    mesh = optional_mesh(values["mesh"])
    model = str(values["model"])
    kind = kind_of(model)
    if kind == "missing":
        raise UsageError(f"--model {model} does not exist")
    manager = task_manager(settings.tasks, settings.include_path)  # before loading weights
    loaded, run_dir, step = _load(values, kind, mesh)
    tokenizer = _tokenizer(loaded, values["tokenizer"])
    import jax.numpy as jnp

    info = {"model": model, "kind": loaded.kind, "step": step,
            "method": getattr(loaded.run_config, "method", None)
            or ("fp8 export" if loaded.kind == "fp8" else values["method"]),
            "dtype": jnp.dtype(loaded.model.module.dtype).name, "mesh": values["mesh"]}
    results = evaluate(loaded.model.module, loaded.model.params, tokenizer, settings,
                       mesh=mesh, info=info, manager=manager)
    print(table(results))
    path = output_path(values, settings, run_dir, step if loaded.kind == "checkpoint" else None)
    if path is not None:
        from falqon_jax.train.outdir import writing

        with writing(path):
            write_results(results, path)
    print(f"eval: {summary(results)}" + (f" ({path})" if path else ""))
    if path is None:
        print("note: pass --output FILE.json to keep the full results", file=sys.stderr)
    return 0



def _load(values: dict[str, Any], kind: str,
          mesh: Any) -> tuple[Any, Path | None, int | None]:
    """The model (:func:`falqon_jax.sources.load_any`, split over ``mesh`` if one) and, for
    a run or one of its checkpoints, the run's directory and the checkpoint's step."""
    import warnings

    from falqon_jax.sources import load_any

    with warnings.catch_warnings():  # unconverted-layer notices are not news here
        warnings.simplefilter("ignore", UserWarning)
        loaded = load_any(values["model"], method=values["method"], rank=values["rank"],
                          alpha=values["alpha"], dtype=values["dtype"], seed=values["seed"],
                          init=values["init"], mesh=mesh)
    if kind not in ("run", "checkpoint"):
        return loaded, None, None
    from falqon_jax.train.runs import resolve_checkpoint

    run_dir, step_dir = resolve_checkpoint(values["model"])
    return loaded, run_dir, int(step_dir.name)


def _tokenizer(loaded: Any, override: str | None) -> Any:
    """The model's tokenizer (generate's), or the demo's character tokenizer for
    ``--tokenizer char`` and runs trained with it."""
    run_char = getattr(loaded.run_config, "tokenizer", None) == CHAR_TOKENIZER
    if override == CHAR_TOKENIZER or (override is None and run_char):
        from falqon_jax.train.demo_data import CharTokenizer

        return CharTokenizer()
    from falqon_jax.generate import UsageError as GenerateUsageError
    from falqon_jax.generate import load_tokenizer

    try:
        return load_tokenizer(loaded, override)
    except GenerateUsageError as err:
        message = str(err).replace("or --prompt-ids", "or --tokenizer char (the demo's "
                                   "character tokenizer)")
        raise UsageError(message) from None


def output_path(values: dict[str, Any], settings: Settings, run_dir: Path | None,
                step: int | None) -> Path | None:
    """Where the results JSON goes: ``--output`` (a ``.json`` file, or a directory), else
    the run's ``OUT/eval/`` (``step``: one checkpoint's, named in the file); ``None`` for a
    model that is no run, without ``--output``."""
    from falqon_jax.eval.harness import results_name

    name = results_name(settings, step)
    if values["output"] is not None:
        out = Path(values["output"])
        return out if out.suffix == ".json" else out / name
    return None if run_dir is None else run_dir / "eval" / name
