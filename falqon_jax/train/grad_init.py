"""Gradient-aligned ``A`` for FALQON layers (``--init-a grad``).

FALQON freezes ``A`` and trains only ``b``, so every update lies in ``b A``: the rows of
``A`` fix the input directions the fine-tune can change. The paper takes them from the SVD
of the FP8 quantization error, which has nothing to do with the task. Here they are the
top-``r`` right singular vectors of the loss gradient of each dense weight on a few training
batches, ``dL/dW = sum_t g_t x_t^T ~ U S V^T``, ``A = V_r`` (scaled to the configured row
norm): the directions in which plain full fine-tuning would move the weight first.

It costs one dense forward/backward per calibration batch and one SVD per matrix, once,
before training (the train steps are FALQON's as ever). The dense gradients of all adapted
weights are held at once: for LLaMA-7B in bfloat16 that is about the model's size again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from falqon_jax import melded
from falqon_jax.model.methods import Dense


def gradient_directions(grad: jax.Array, rank: int) -> jax.Array:
    """Top-``rank`` right singular vectors of ``grad (..., out, in)``: float32
    ``(..., rank, in)`` with orthonormal rows."""
    _, _, vt = jnp.linalg.svd(grad.astype(jnp.float32), full_matrices=False)
    return vt[..., :rank, :]


def dense_gradients(forward: Any, params: Any, batches: Iterable[tuple[Any, Any, Any]],
                    loss_sum: Any) -> Any:
    """Sum over ``batches`` of ``d loss_sum(forward(params, tokens, attention)) / d params``
    for the dense (``Dense``) weights; other leaves get ``None``."""
    def loss(weights, tokens, mask, attention):
        merged = jax.tree.map(lambda w, p: p if w is None else w, weights, params,
                              is_leaf=lambda x: x is None)
        return loss_sum(forward(merged, tokens, attention), tokens, mask)

    weights = jax.tree.map(lambda leaf: leaf if isinstance(leaf, Dense) else None, params,
                           is_leaf=lambda x: isinstance(x, Dense))
    grad_fn = jax.jit(jax.grad(loss))
    total = None
    for tokens, mask, attention in batches:
        g = grad_fn(weights, tokens, mask, attention)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


def realign(falqon_params: Any, dense_params: Any, grads: Any, a_row_norm: Any) -> Any:
    """``falqon_params`` with every melded layer rebuilt from its dense weight, ``A`` the
    top right singular vectors of its gradient (``a_row_norm(in, rank)`` gives the norm).

    ``dense_params`` and ``grads`` mirror ``falqon_params`` with ``Dense`` leaves where the
    melded layers are (a ``method="full"`` model of the same checkpoint).
    """
    def rebuild(layer, dense, grad):
        if not melded.is_melded(layer):
            return layer
        a = gradient_directions(grad.w, layer.rank)
        norm = a_row_norm(layer.in_features, layer.rank)

        def one(w, a):
            return melded.init(w, layer.rank, init="given", a=a, a_row_norm=norm,
                               b_in_forward=layer.b_in_forward)

        build = one
        for _ in range(dense.w.ndim - 2):  # stacked layers
            build = jax.vmap(build)
        return build(dense.w.astype(jnp.float32), a)

    return jax.tree.map(rebuild, falqon_params, dense_params, grads,
                        is_leaf=lambda x: melded.is_melded(x) or isinstance(x, Dense))
