"""The package's layers: no import cycles, lower layers never import higher ones, and the
public entry points stay where users find them.

Imports are read from the source (every ``import`` statement, also those inside functions),
so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "falqon_jax"

# Layer of each top-level part; a module may import its own layer's modules and lower layers.
LAYERS = {
    "falqon_jax.fp8": 0, "falqon_jax.sharding": 0, "falqon_jax.cli": 0, "falqon_jax.hub": 0,
    "falqon_jax.targets": 0, "falqon_jax.gpu_program": 0, "falqon_jax.packaged": 0,
    "falqon_jax.rules": 0, "falqon_jax.tree_paths": 0,
    "falqon_jax.melded": 1, "falqon_jax.merging": 1, "falqon_jax.optax": 1,
    "falqon_jax.baselines": 2,
    "falqon_jax.model": 3,
    "falqon_jax.train": 4, "falqon_jax.export": 4,
    "falqon_jax.eval": 4,  # the LM wrapper and harness; a training run's --eval-tasks uses them
    "falqon_jax": 4,  # the package root: load_model (model) and restore (train.runs)
    "falqon_jax.sources": 5,
    "falqon_jax.export.cli": 6, "falqon_jax.export.__main__": 6, "falqon_jax.generate": 6,
    "falqon_jax.eval.cli": 6, "falqon_jax.eval.__main__": 6,
    "falqon_jax.bench": 6, "falqon_jax.demo": 6,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from pkg import mod`` counts as ``mod``)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("falqon_jax"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("falqon_jax")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def layer(module: str) -> int:
    """The layer of the longest prefix of ``module`` named in :data:`LAYERS`."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer in LAYERS; add it")


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_lower_layers_do_not_import_higher_ones():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the package
    wrong = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
             for m, deps in sorted(graph.items()) for d in sorted(deps) if layer(d) > layer(m)]
    assert not wrong, "\n".join(wrong)


def test_a_layering_violation_would_be_reported():
    """The check itself: an imagined import of the trainer by the FP8 math is caught."""
    assert layer("falqon_jax.train.trainer") > layer("falqon_jax.fp8")
    assert layer("falqon_jax.bench.cases") > layer("falqon_jax.model.llama")
    assert layer("falqon_jax.export.writer") < layer("falqon_jax.export.cli")


@pytest.mark.parametrize("command", ["train", "generate", "export", "bench", "demo", "eval"])
def test_python_dash_m_entry_points_exist(command):
    spec = importlib.util.find_spec(f"falqon_jax.{command}")
    assert spec is not None
    if spec.submodule_search_locations is not None:  # a package: needs a __main__
        assert importlib.util.find_spec(f"falqon_jax.{command}.__main__") is not None


def test_public_python_api():
    import falqon_jax
    from falqon_jax.optax import falqon_optimizer, falqon_update
    from falqon_jax.train import TrainConfig, finetune

    assert callable(falqon_jax.load_model) and callable(falqon_update)
    assert callable(falqon_optimizer) and callable(finetune)
    assert TrainConfig().method == "falqon"
