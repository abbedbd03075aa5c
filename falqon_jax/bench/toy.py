"""A toy fine-tuning problem: adapt a 2-layer MLP to a shifted teacher.

The "pretrained" MLP ``y = W2 silu(W1 x)`` must learn a teacher whose weights differ by a
low-rank delta. Three ways to adapt it on identical data, steps and optimizer:

* ``falqon``: both layers melded (FP8 backbone, frozen ``A`` from the quantization error at
  its natural scale, ``b`` trained through :func:`falqon_jax.optax.falqon_optimizer` with
  the update ``rule`` of :func:`train`: the default live ``b``, or e.g. the paper's proxy
  buffer with top-k merges);
* ``lora_frozen_a``: float32 LoRA that trains only ``B`` on the *same* frozen ``A`` --
  the float32 reference for what FALQON can express, isolating FP8 arithmetic and the
  update rule;
* ``lora``: standard float32 LoRA (``A`` random, both factors trained).

Used by the test suite and by ``python -m falqon_jax.demo``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from falqon_jax import melded, rules
from falqon_jax.optax import falqon_optimizer
from falqon_jax.rules import DEFAULT_RULE

METHODS = ("falqon", "lora_frozen_a", "lora")


@dataclass(frozen=True)
class ToyProblem:
    """Base weights (float32, HF layout) and a fixed data set."""

    w1: np.ndarray  # (hidden, dim)
    w2: np.ndarray  # (dim, hidden)
    x_train: np.ndarray  # (n, dim)
    y_train: np.ndarray  # (n, dim)
    x_test: np.ndarray
    y_test: np.ndarray


def make_problem(
    dim: int = 64, hidden: int = 128, delta_rank: int = 4, n: int = 2048, seed: int = 0
) -> ToyProblem:
    """A teacher ``W + U V`` with a rank-``delta_rank`` delta per layer, and its data."""
    rng = np.random.default_rng(seed)

    def weight(out, inp):
        return rng.standard_normal((out, inp)) / np.sqrt(inp)

    def delta(out, inp):
        return 0.5 * (rng.standard_normal((out, delta_rank)) / np.sqrt(delta_rank)) @ (
            rng.standard_normal((delta_rank, inp)) / np.sqrt(inp)
        )

    w1, w2 = weight(hidden, dim), weight(dim, hidden)
    t1, t2 = w1 + delta(hidden, dim), w2 + delta(dim, hidden)
    x = rng.standard_normal((2 * n, dim))
    y = _mlp(x, t1, t2)
    f32 = np.float32
    return ToyProblem(
        w1.astype(f32), w2.astype(f32), x[:n].astype(f32), y[:n].astype(f32),
        x[n:].astype(f32), y[n:].astype(f32),
    )


def _silu(h):
    return h / (1 + np.exp(-h)) if isinstance(h, np.ndarray) else jax.nn.silu(h)


def _mlp(x, w1, w2):
    return _silu(x @ w1.T) @ w2.T


def _init(method: str, problem: ToyProblem, rank: int, key: jax.Array, rule: str):
    """Params and a forward function ``f(params, x) -> y`` for one method."""
    layers = {"w1": problem.w1, "w2": problem.w2}
    if method == "falqon":
        live = rules.get(rule).live_b
        params = {name: melded.init(jnp.asarray(w), rank, b_in_forward=live)
                  for name, w in layers.items()}

        def linear(p, x):
            return melded.apply(p, x)

        return params, linear
    params = {}
    for i, (name, w) in enumerate(layers.items()):
        if method == "lora_frozen_a":
            a = melded.init(jnp.asarray(w), rank).a()  # FALQON's frozen A, dequantized
        else:  # PEFT-style kaiming-uniform A
            bound = 1.0 / np.sqrt(w.shape[1])
            a = jax.random.uniform(jax.random.fold_in(key, i), (rank, w.shape[1]),
                                   jnp.float32, -bound, bound)
        params[name] = {"w": jnp.asarray(w), "a": a, "b": jnp.zeros((w.shape[0], rank))}

    def lora_linear(p, x):
        a = p["a"] if method == "lora" else jax.lax.stop_gradient(p["a"])
        return x @ jax.lax.stop_gradient(p["w"]).T + (x @ a.T) @ p["b"].T

    return params, lora_linear


def train(
    method: str,
    problem: ToyProblem,
    *,
    rank: int = 16,
    steps: int = 300,
    lr: float = 1e-2,
    batch: int = 128,
    top_k: int | None = 10,
    rule: str = DEFAULT_RULE,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Fine-tune with ``method`` (FALQON with update ``rule`` and ``top_k``); returns the
    initial/final test loss (MSE)."""
    if method not in METHODS:
        raise ValueError(f"unknown toy method {method!r}; choose from {METHODS}")
    key = jax.random.key(seed)
    params, linear = _init(method, problem, rank, key, rule)

    def loss_fn(params, x, y):
        h = jax.nn.silu(linear(params["w1"], x))
        return jnp.mean((linear(params["w2"], h) - y) ** 2)

    inner = optax.adam(lr)
    if method == "falqon":
        tx = falqon_optimizer(inner, top_k, rule=rule)
    else:  # frozen leaves get zero gradients through stop_gradient
        tx = inner
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    test_loss = jax.jit(loss_fn)
    x_test, y_test = jnp.asarray(problem.x_test), jnp.asarray(problem.y_test)
    initial = float(test_loss(params, x_test, y_test))
    rng = np.random.default_rng(seed)
    n = problem.x_train.shape[0]
    for i in range(steps):
        idx = rng.integers(0, n, batch)
        params, state, loss = step(params, state, problem.x_train[idx], problem.y_train[idx])
        if on_step is not None:
            on_step(i, float(loss))
    return {"initial_loss": initial, "final_loss": float(test_loss(params, x_test, y_test))}
