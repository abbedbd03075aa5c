"""Names of pytree leaves and nested dicts keyed by them: how proxy buffers and checkpoint
parts are stored (``{"layers": {"mlp": {"up_proj": {"b": Array}}}}``), readable in any tool."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """The names of a pytree key path (``jax.tree_util`` entries: dict keys, attribute
    names, sequence indices), e.g. ``("params", "layers", "mlp", "up_proj", "b")``."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            raise TypeError(f"unsupported pytree path entry {entry!r}")
    return tuple(names)


def nested_set(tree: dict[str, Any], names: Sequence[str], value: Any) -> None:
    """``tree[names[0]][names[1]]...[names[-1]] = value``, creating the dicts on the way."""
    for name in names[:-1]:
        tree = tree.setdefault(name, {})
    tree[names[-1]] = value


def nested_get(tree: dict[str, Any], names: Sequence[str]) -> Any:
    """``tree[names[0]][names[1]]...[names[-1]]``."""
    for name in names:
        tree = tree[name]
    return tree
