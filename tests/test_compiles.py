"""The train step compiles once per shape: the state it returns has exactly the dtypes, weak
types and shardings of the state it takes, for every method, with and without a mesh, so
its second call reuses the first call's program (and the speed bench's warm-up of one
step leaves no compilation inside the timed steps)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from falqon_jax import sharding
from falqon_jax.bench import cases, speed
from falqon_jax.model.config import load_card
from falqon_jax.model.llama import Llama, abstract_params, plan_linears, trainable_mask
from falqon_jax.model.methods import linear_method
from falqon_jax.train.config import PAPER
from falqon_jax.train.trainer import Trainer

METHODS = [  # (method, config overrides): every method, FALQON with and without buffers
    ("falqon", {}),
    ("falqon", {"rule": "paper"}),
    ("lora", {}),
    ("fp8_lora", {}),
    ("qlora", {}),
    ("full", {}),
]
BATCH, SEQ = 2, 16


def _random(abstract: Any) -> Any:
    """Arrays of ``abstract``'s shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), made on
    the host: small normal floats (FP8 included), integers in ``[0, 16)`` (NF4 codes)."""
    rng = np.random.default_rng(0)

    def make(leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return jnp.asarray(rng.integers(0, 16, leaf.shape).astype(leaf.dtype))
        return jnp.asarray((0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype))

    return jax.tree.map(make, abstract)


def _trainer(method: str, mesh: Any, **overrides: Any) -> tuple[Trainer, Any]:
    """A trainer of a one-layer tiny card (bfloat16) and its initial state. The params are
    random values of the model's shapes and dtypes (no FALQON or NF4 conversion to wait
    for)."""
    config = dataclasses.replace(PAPER, model="tiny", init="random", method=method, rank=8,
                                 top_k=2, batch_size=BATCH, steps=10, remat=False,
                                 **overrides)
    llama_config = dataclasses.replace(load_card("tiny"), num_layers=1)
    plan = plan_linears(llama_config, linear_method(config), targets=config.targets,
                        rank=config.rank, alpha=config.alpha)
    module = Llama(llama_config, plan, jnp.dtype(config.dtype), remat=config.remat)
    params = _random(abstract_params(module))

    def forward(params, tokens, attention):
        return module.apply({"params": params}, tokens, attention)

    trainer = Trainer(config, forward, trainable_mask(params, plan), mesh)
    return trainer, trainer.init_state(params)


def _batch(mesh: Any) -> list[jax.Array]:
    """tokens int32, loss mask float32, attention int32, all ``[BATCH, SEQ]``; split over
    ``mesh``'s batch axes as training places them."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(3, 500, (BATCH, SEQ), dtype=np.int32),
              np.ones((BATCH, SEQ), np.float32), np.ones((BATCH, SEQ), np.int32)]
    if mesh is None:
        return [jnp.asarray(a) for a in arrays]
    rows = sharding.batch_sharding(mesh)
    return [sharding.global_batch(rows, a) for a in arrays]


def _types(state: Any) -> list[tuple[str, Any]]:
    """What a jitted function's cache key holds of each leaf: dtype, weak type, sharding,
    committedness and layout."""
    return [(jax.tree_util.keystr(path), (x.dtype, x.weak_type, x.sharding, x.committed,
                                          x.format.layout))
            for path, x in jax.tree_util.tree_leaves_with_path(state)]


def _three_steps(trainer: Trainer, state: Any, mesh: Any) -> None:
    batch = _batch(mesh)
    before = _types(state)
    for _ in range(3):
        state, metrics = trainer.train_step(state, *batch)
    assert np.isfinite(float(metrics["loss"]))
    changed = [(path, was, now) for (path, was), (_, now) in zip(before, _types(state),
                                                                strict=True) if was != now]
    assert trainer.train_step._cache_size() == 1, changed[:3]  # one compile in three steps
    assert not changed, changed[:3]


@pytest.mark.parametrize(("method", "overrides"), METHODS,
                         ids=[m + "".join(f"-{v}" for v in o.values()) for m, o in METHODS])
def test_train_step_compiles_once_on_a_mesh(method: str, overrides: dict[str, str]) -> None:
    """As training runs it: the state placed on a mesh, the step keeping its shardings."""
    mesh = sharding.parse_mesh("fsdp=1", jax.devices()[:1])
    trainer, state = _trainer(method, mesh, **overrides)
    _three_steps(trainer, state, mesh)


@pytest.mark.parametrize("method", ["falqon", "full"])
def test_train_step_compiles_once_without_a_mesh(method: str) -> None:
    trainer, state = _trainer(method, None)
    _three_steps(trainer, state, None)


def test_speed_bench_times_no_compilation() -> None:
    """``bench speed``'s model row of ``full`` (the issue's ``full tiny:2L``, on one layer):
    after a warm-up of one step, the timed steps compile nothing."""
    settings = cases.Settings(methods=("full",), shapes=(), tokens=32, rank=8,
                              model_card="tiny", model_layers=1, batch=BATCH, seq=SEQ,
                              top_k=2, remat=False, seed=0)
    row = speed.speed_row(cases.model_case("full", settings), speed.environment(),
                          repeats=2, warmup=1, seed=0)
    assert row["compiles"] == 1
