"""Running lm-evaluation-harness on the project's model: which tasks, loading them, one
``lm_eval.simple_evaluate`` call, and the results (table, JSON file, one summary line).

Shared by ``python -m falqon_jax.eval`` (:mod:`falqon_jax.eval.cli`) and by a training run's
``--eval-tasks`` (:func:`evaluate_trained`, called at the end of the run). lm-eval is the
``eval`` extra: it is imported only here, when an evaluation runs, and its absence is one
line naming the install command (:func:`require_lm_eval`).

Task names are lm-eval's (a task, group or tag: ``mmlu``, ``arc_easy``, ...) or paths of task
YAML files; ``include_path`` adds a folder of the user's own task YAML files. Building
lm-eval's index of its ~15,000 built-in tasks takes seconds, so when every task asked for
is found, with all it refers to, in ``include_path`` (or is a YAML file of one task), only
those files are indexed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from falqon_jax import packaged
from falqon_jax.cli import quiet_logger


class EvalError(ValueError):
    """A mistake in an evaluation's settings or tasks; reported as one line."""


def require_lm_eval() -> None:
    """Raise :class:`EvalError` naming the install command when lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(
            "evaluating needs EleutherAI's lm-evaluation-harness (the eval extra): "
            f"{packaged.install_command('eval')}") from None


def split_tasks(text: str | Sequence[str]) -> list[str]:
    """Task names from ``"a,b"`` or a list, in order, without blanks or repeats."""
    names = text.split(",") if isinstance(text, str) else list(text)
    return list(dict.fromkeys(n.strip() for n in names if n and n.strip()))


# --------------------------------------------------------------------------------------
# Tasks.


@functools.cache
def _manager(include_path: str | None, defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    with quiet_logger("lm_eval"):
        return TaskManager(include_path=include_path, include_defaults=defaults)


def task_manager(names: Sequence[str], include_path: str | None = None) -> Any:
    """lm-eval's ``TaskManager`` for ``names``, after checking that each is a task, group
    or tag it knows (or a task YAML file). Raises :class:`EvalError` for an unknown name
    (with close matches) or an ``include_path`` that is not a directory."""
    require_lm_eval()
    if not names:
        raise EvalError("no tasks: pass --tasks NAME[,NAME...] (e.g. mmlu, arc_easy)")
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise EvalError(f"the task folder {include_path} is not a directory")
        include_path = str(Path(include_path).resolve())
    local = _manager(include_path, False)
    if all(_self_contained(local, name, frozenset()) for name in names):
        return local
    manager = _manager(include_path, True)
    for name in names:
        if name not in manager.task_index and not _is_yaml(name):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            where = f" nor in {include_path}" if include_path else ""
            raise EvalError(f"unknown task {name!r}: not a task, group or tag of lm-eval{where}"
                            f"{hint}; `lm-eval ls tasks` lists them, and a task YAML file "
                            "can be given by its path")
    return manager


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def _self_contained(manager: Any, name: str, seen: frozenset[str]) -> bool:
    """Whether ``name`` loads from ``manager``'s own index alone: a task or tag there, a
    group there whose members all are, or a YAML file of a single task."""
    if _is_yaml(name):
        from lm_eval.tasks._index import TaskIndex

        try:
            entry = TaskIndex.entry_from_path(Path(name))
        except Exception:  # noqa: BLE001 -- the full manager reports it
            return False
        return entry is not None and entry.kind.name in ("TASK", "PY_TASK")
    entry = manager.task_index.get(name)
    if entry is None or name in seen:
        return False
    if entry.kind.name != "GROUP":
        return True
    members = (entry.cfg or {}).get("task", [])
    for member in members if isinstance(members, list) else [members]:
        if isinstance(member, dict):
            ref = member.get("task")
            ok = "group" not in member and isinstance(ref, str) and (
                "dataset_path" in member or _self_contained(manager, ref, seen | {name}))
        else:
            ok = isinstance(member, str) and _self_contained(manager, member, seen | {name})
        if not ok:
            return False
    return True


def load_tasks(manager: Any, names: Sequence[str]) -> list[Any]:
    """lm-eval's task and group objects for ``names`` (a tag gives its tasks), built here
    (their data sets loaded) so that a task that cannot be loaded is one line naming it."""
    built: list[Any] = []
    for name in names:
        try:
            with quiet_logger("lm_eval"):
                loaded = manager.load([name])
        except Exception as err:  # noqa: BLE001 -- lm-eval's and datasets' many error types
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise EvalError(f"task {name} cannot be loaded: {type(err).__name__}"
                            f"{': ' + first if first else ''}") from None
        groups = loaded["groups"]
        inner = {c for children in loaded.get("group_map", {}).values() for c in children}
        tops = [g for n, g in groups.items() if n not in inner]
        tops += [t for n, t in loaded["tasks"].items() if n not in inner]
        built.extend(tops)
    return built


# --------------------------------------------------------------------------------------
# Evaluating.


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to evaluate and how: lm-eval task names (or YAML paths), ``num_fewshot``
    (``None``: each task's own), ``limit`` (examples per task; a fraction below 1),
    ``batch_size`` (rows per forward), ``include_path``, ``max_length`` (``None``: the
    model's context length), ``log_samples`` (keep every request and response in the
    results), ``bootstrap_iters`` (lm-eval's, for the standard errors of non-mean
    metrics)."""

    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int = 16
    include_path: str | None = None
    max_length: int | None = None
    log_samples: bool = False
    bootstrap_iters: int = 100000

    def check(self) -> None:
        """Raise :class:`EvalError` for values out of range."""
        if not self.tasks:
            raise EvalError("no tasks: pass --tasks NAME[,NAME...] (e.g. mmlu, arc_easy)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise EvalError(f"--num-fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and not self.limit > 0:
            raise EvalError(f"--limit must be positive, got {self.limit}")
        if self.batch_size < 1:
            raise EvalError(f"--batch-size must be positive, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 2:
            raise EvalError(f"--max-length must be at least 2, got {self.max_length}")
        if self.bootstrap_iters < 0:
            raise EvalError(f"--bootstrap-iters must be >= 0, got {self.bootstrap_iters}")

    @property
    def lm_eval_limit(self) -> int | float | None:
        """``limit`` as lm-eval reads it: a count of examples, or a fraction below 1."""
        if self.limit is None or self.limit < 1:
            return self.limit
        return int(self.limit)


def evaluate(module: Any, params: Any, tokenizer: Any, settings: Settings, *,
             mesh: Any = None, info: dict[str, Any] | None = None,
             manager: Any = None) -> dict[str, Any]:
    """Evaluate ``module`` with ``params`` (the project's model as it is, e.g. an FP8
    backbone with a live ``b``) and ``tokenizer`` on ``settings.tasks`` with
    ``lm_eval.simple_evaluate``; returns its results dict (``info``, what the model is, as
    ``results["config"]`` entries). Raises :class:`EvalError` for an unknown task, one that
    cannot be loaded, or a tokenizer that does not fit the model."""
    settings.check()
    require_lm_eval()
    if manager is None:
        manager = task_manager(settings.tasks, settings.include_path)
    built = load_tasks(manager, settings.tasks)
    import lm_eval

    from falqon_jax.eval.lm import FalqonLM

    try:
        lm = FalqonLM(module, params, tokenizer, batch_size=settings.batch_size,
                      max_length=settings.max_length, mesh=mesh,
                      info={"model_backend": "falqon_jax", **(info or {})})
    except ValueError as err:
        raise EvalError(str(err)) from None
    from falqon_jax.eval.scoring import RequestError

    try:
        with quiet_logger("lm_eval", logging.WARNING):  # its INFO lines are its internals'
            results = lm_eval.simple_evaluate(
                model=lm, tasks=built, num_fewshot=settings.num_fewshot,
                limit=settings.lm_eval_limit, task_manager=manager,
                log_samples=settings.log_samples, bootstrap_iters=settings.bootstrap_iters)
    except RequestError as err:
        raise EvalError(str(err)) from None
    if results is None:  # not the first process of a multi-process job
        return {}
    results["config"]["batch_size"] = lm.batch_size
    return results


# --------------------------------------------------------------------------------------
# Results.


def table(results: dict[str, Any]) -> str:
    """lm-eval's results table (and its groups table, if any), as its own CLI prints them."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def to_json(results: dict[str, Any]) -> str:
    """The results as lm-eval's CLI writes them (what JSON cannot hold, as text)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable,
                      ensure_ascii=False) + "\n"


def results_name(settings: Settings, step: int | None = None) -> str:
    """The file name of a run's results: ``results-<tasks>[-<n>shot][-limit<N>]
    [-step<S>].json`` (task YAML paths by their file name; a long name shortened with a
    hash)."""
    names = [Path(n).stem if _is_yaml(n) else n for n in settings.tasks]
    stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", "+".join(names))
    if len(stem) > 100:
        stem = stem[:80] + "-" + hashlib.sha1(stem.encode()).hexdigest()[:8]
    if settings.num_fewshot is not None:
        stem += f"-{settings.num_fewshot}shot"
    if settings.limit is not None:
        stem += f"-limit{settings.lm_eval_limit:g}"
    if step is not None:
        stem += f"-step{step}"
    return f"results-{stem}.json"


def main_metric(metrics: dict[str, Any]) -> str | None:
    """The key of a task's headline metric: ``acc``, else ``exact_match``, else the first
    numeric one that is not a standard error."""
    keys = [k for k, v in metrics.items()
            if "," in k and "_stderr" not in k and isinstance(v, int | float)]
    for wanted in ("acc", "exact_match", "word_perplexity"):
        for k in keys:
            if k.split(",")[0] == wanted:
                return k
    return keys[0] if keys else None


def summary(results: dict[str, Any]) -> str:
    """One line: each top-level task or group with its headline metric, e.g.
    ``mmlu acc 0.2512, arc_easy acc 0.4301``."""
    members = {c for children in results.get("group_subtasks", {}).values() for c in children}
    parts = []
    for name, metrics in results.get("results", {}).items():
        if name in members:
            continue
        key = main_metric(metrics)
        if key is not None:
            metric, _, kind = key.partition(",")
            label = metric if kind in ("", "none") else f"{metric} ({kind})"
            parts.append(f"{name} {label} {metrics[key]:.4f}")
    return ", ".join(parts) or "no metrics"


def scalars(results: dict[str, Any]) -> dict[str, float]:
    """Every task's and group's numeric metrics, standard errors aside, as
    ``{"lm_eval/<task>/<metric>": value}`` (a filter other than ``none`` is named after the
    metric, ``acc_strict``), for TensorBoard or W&B."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, comma, kind = key.partition(",")
            if comma and "_stderr" not in metric and isinstance(value, int | float) \
                    and not isinstance(value, bool):
                name = metric if kind in ("", "none") else f"{metric}_{kind}"
                out[f"lm_eval/{task}/{name}"] = float(value)
    return out


def write_results(results: dict[str, Any], path: Path) -> None:
    """Write ``results`` to ``path`` (its folder created) so that a crash leaves either
    the old or the new file."""
    from falqon_jax.train.outdir import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, to_json(results))


# --------------------------------------------------------------------------------------
# The end of a training run.


def train_settings(config: Any) -> Settings:
    """A training run's ``--eval-*`` settings (a :class:`~falqon_jax.train.config.
    TrainConfig`); one micro-batch of rows per forward."""
    return Settings(tasks=tuple(split_tasks(config.eval_tasks)),
                    num_fewshot=config.eval_fewshot, limit=config.eval_limit,
                    batch_size=max(1, config.batch_size // config.grad_accum),
                    include_path=config.eval_include_path)


def check_train_settings(config: Any) -> None:
    """Before a run with ``--eval-tasks`` trains: lm-eval is installed and knows the tasks
    (one line and exit 2 now, not after the training)."""
    settings = train_settings(config)
    settings.check()
    task_manager(settings.tasks, settings.include_path)


def evaluate_trained(model: Any, tokenizer: Any, config: Any, mesh: Any, out: Path,
                     step: int, primary: bool) -> tuple[str, dict[str, float]]:
    """Evaluate a run's final ``model`` (its module and params as trained) on its
    ``--eval-tasks``; the results go to ``OUT/eval/results-<tasks>.json`` (written by the
    ``primary`` process). Returns the summary line and the metrics (:func:`scalars`)."""
    settings = train_settings(config)
    info = {"model": str(out), "kind": "run", "step": step, "method": config.method,
            "dtype": config.dtype}
    results = evaluate(model.module, model.params, tokenizer, settings, mesh=mesh, info=info,
                       manager=task_manager(settings.tasks, settings.include_path))
    path = out / "eval" / results_name(settings)
    if primary and results:
        from falqon_jax.train.outdir import writing

        with writing(path):  # a full disk: one line, exit 74, as for the run's other files
            write_results(results, path)
    return f"eval: {summary(results)} ({path})", scalars(results)
