"""The jit-compiled training step: loss, gradient accumulation, optimizer, FALQON merges.

Gradients are taken with respect to the *trainable* leaves only (``partition`` splits the
params by the model's trainable mask), so frozen FP8/NF4 weights never get gradients,
optimizer moments or accumulators. For FALQON, the update rule
(:func:`falqon_jax.optax.falqon_update`, :mod:`falqon_jax.rules`) then sends the optimizer's
update of each melded layer's ``b`` into ``b`` (the default rule) or merges its top-k rows into
the FP8 weight (the paper's rules), which :func:`apply_updates` writes in place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh

from falqon_jax import sharding
from falqon_jax.model.methods import training_method
from falqon_jax.optax import falqon_update
from falqon_jax.train.config import TrainConfig


def partition(params: Any, mask: Any) -> tuple[Any, Any]:
    """Split ``params`` into ``(trainable, frozen)`` trees; absent leaves are ``None``."""
    trainable = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`partition`."""
    return jax.tree.map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )


def cast_like(tree: Any, like: Any) -> Any:
    """``tree`` with each array leaf cast to the dtype of the same leaf of ``like`` (the same
    structure; traceable). The train step returns its state in exactly the dtypes it took, so
    its second call reuses the first call's compilation."""
    return jax.tree.map(lambda x, y: x if x.dtype == y.dtype else x.astype(y.dtype),
                        tree, like)


def strong_types(tree: Any) -> Any:
    """``tree`` with every weakly typed array leaf (a Python scalar's type) made strongly
    typed in its own dtype: a jitted step's outputs are never weakly typed, so a weakly
    typed input would make its second call compile again."""
    return jax.tree.map(
        lambda x: jnp.asarray(x, x.dtype) if getattr(x, "weak_type", False) else x, tree)


def apply_updates(params: Any, updates: Any) -> Any:
    """``optax.apply_updates`` that skips ``None`` updates (leaves left out of the gradient)."""
    return jax.tree.map(
        lambda p, u: p if u is None else jnp.asarray(p + u).astype(jnp.asarray(p).dtype),
        params, updates, is_leaf=lambda x: x is None,
    )


def learning_rate(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_ratio * planned_steps``, then constant, or a
    cosine / linear decay to 0 at ``planned_steps`` (``--schedule-steps``, else ``--steps``;
    :attr:`TrainConfig.planned_steps`), so a run resumed with another ``--steps`` keeps the
    schedule it started with."""
    horizon = config.planned_steps
    warmup = int(round(config.warmup_ratio * horizon))
    rest = max(horizon - warmup, 1)
    if config.schedule == "constant":
        after = optax.constant_schedule(config.lr)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(config.lr, rest)
    else:
        after = optax.linear_schedule(config.lr, 0.0, rest)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), after], [warmup])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clipping + AdamW over the trainable leaves (the paper's optimizer)."""
    parts = []
    if config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    # The first moment in float32 whatever the params' dtype: the step's gradients are
    # float32 (divided by the float32 token count), so it is what the step computes; the
    # second moment keeps the params' dtype (optax casts it back).
    parts.append(optax.adamw(learning_rate(config), b1=0.9, b2=config.beta2,
                             weight_decay=config.weight_decay, mu_dtype=jnp.float32))
    return optax.chain(*parts)


def make_merge(config: TrainConfig) -> optax.GradientTransformation:
    """What follows the optimizer: for a melded method (FALQON), the update rule's
    :func:`~falqon_jax.optax.falqon_update` over the whole params; otherwise nothing (an
    empty state, as a checkpoint of such a run holds)."""
    if not training_method(config).melded:
        return optax.GradientTransformation(lambda params: (),
                                            lambda updates, state, params=None: (updates, state))
    return falqon_update(config.top_k, rule=config.rule, reset=config.reset,
                         rounding=config.rounding, seed=config.seed)


def on_trainable(inner: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """``inner`` on the trainable part of the params only (:func:`partition` by ``mask``):
    its state and the params it sees hold no frozen leaf, and the updates it takes and
    returns are shaped like that part (``None`` for frozen leaves)."""

    def init(params: Any) -> Any:
        return inner.init(partition(params, mask)[0])

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        trainable = None if params is None else partition(params, mask)[0]
        return inner.update(updates, state, trainable)

    return optax.GradientTransformation(init, update)


def make_transformation(config: TrainConfig, mask: Any) -> optax.GradientTransformation:
    """A run's whole update as one optax chain: clipping + AdamW on the trainable leaves,
    then the melded layers' rule (:func:`make_merge`). Its state is the pair a checkpoint
    holds as ``opt_state`` and ``falqon_state``."""
    return optax.chain(on_trainable(make_optimizer(config), mask), make_merge(config))


# optax.tree.norm replaced optax.global_norm (deprecated) in newer optax releases.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


class TrainState(NamedTuple):
    """Everything a checkpoint holds: params (FP8 weights included), optimizer state
    (FALQON proxy buffers included) and the step counter."""

    params: Any
    opt_state: Any
    falqon_state: Any
    step: jax.Array


def token_loss_sum(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of next-token cross-entropies where ``mask`` is 1 (float32 scalar).

    logits ``[B, L, V]`` (any float dtype; the softmax runs in float32); tokens int32
    ``[B, L]``; mask float32 ``[B, L]`` where ``mask[:, i]`` weights the prediction of
    ``tokens[:, i]`` from the tokens before it.

    Written as ``logsumexp(logits) - logit of the next token`` at every position (the last
    one weighted 0), with the picked logit selected by comparison, not gathered: the
    gradient is then ``softmax - one_hot`` in one elementwise pass, with no scatter into a
    float32 ``[B, L, V]`` of zeros and no padding of a sliced ``[B, L - 1, V]``.
    """
    logits = logits.astype(jnp.float32)
    following = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # next token
    weights = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    vocab = lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    picked = jnp.sum(jnp.where(vocab == following[..., None], logits, 0.0), axis=-1)
    return -jnp.sum((picked - jax.nn.logsumexp(logits, axis=-1)) * weights)


class Trainer:
    """Builds the initial state and the jitted train/eval steps for one model and config.

    ``forward(params, tokens, attention) -> logits`` is the model; ``mask`` its trainable
    mask (a bool tree shaped like the params).
    """

    def __init__(
        self,
        config: TrainConfig,
        forward: Callable[[Any, jax.Array, jax.Array], jax.Array],
        mask: Any,
        mesh: Mesh | None = None,
    ) -> None:
        self.config = config
        self.forward = forward
        self.mask = mask
        self.mesh = mesh
        self.transformation = make_transformation(config, mask)
        self.schedule = learning_rate(config)
        self.step_fn = self._under_mesh(self._train_step)
        """The traceable step ``(state, tokens, mask, attention) -> (state, metrics)``."""
        self.train_step = jax.jit(self.step_fn, donate_argnums=(0,))
        self.eval_step = jax.jit(self._under_mesh(self._eval_sums))

    def _under_mesh(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` traced under :func:`sharding.gathering_weights` (FSDP weight gathers)."""

        @functools.wraps(fn)
        def traced(*args):
            with sharding.gathering_weights(self.mesh):
                return fn(*args)

        return traced

    def fresh_state(self, params: Any) -> TrainState:
        """The initial state of ``params``, unplaced (traceable: works under ``eval_shape``):
        in the dtypes, strongly typed, that the train step returns it in."""
        opt_state, falqon_state = self.transformation.init(params)
        return strong_types(TrainState(params, opt_state, falqon_state,
                                       jnp.zeros((), jnp.int32)))

    def sharded_train_step(self, shardings: Any) -> Callable[..., Any]:
        """The jitted train step that keeps the state in ``shardings`` (donating it)."""
        return jax.jit(
            self.step_fn, donate_argnums=(0,),
            out_shardings=(shardings, sharding.replicated(self.mesh)),
        )

    def init_state(self, params: Any) -> TrainState:
        """The initial state; with a mesh, placed by the FSDP partition rules, and the
        train step compiled to keep that layout."""
        state = self.fresh_state(params)
        if self.mesh is not None:
            shardings = sharding.tree_shardings(self.mesh, state)
            state = jax.device_put(state, shardings)
            self.train_step = self.sharded_train_step(shardings)
        return state

    def _loss_sum(self, trainable, frozen, tokens, mask, attention):
        logits = self.forward(combine(trainable, frozen), tokens, attention)
        return token_loss_sum(logits, tokens, mask)

    def _train_step(self, state: TrainState, tokens, mask, attention):
        """One optimizer step on a batch ``[B, L]`` split into ``grad_accum`` micro-batches.

        Returns the new state and metrics (mean token loss, gradient norm, learning rate).
        """
        accum = self.config.grad_accum
        trainable, frozen = partition(state.params, self.mask)
        count = jnp.maximum(jnp.sum(mask[:, 1:]), 1.0)

        def micro(args):  # micro-batch j holds rows j, j + accum, ...: on a mesh, every
            # device keeps its own rows (a contiguous split would move rows between devices)
            return jnp.swapaxes(args.reshape((args.shape[0] // accum, accum) + args.shape[1:]),
                                0, 1)

        grad_fn = jax.value_and_grad(self._loss_sum)

        def accumulate(carry, batch):
            loss_sum, grads = carry
            value, g = grad_fn(trainable, frozen, *batch)
            return (loss_sum + value, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (loss_sum, grads), _ = jax.lax.scan(
            accumulate, (jnp.zeros((), jnp.float32), zeros),
            (micro(tokens), micro(mask), micro(attention)),
        )
        grads = jax.tree.map(lambda g: g / count, grads)
        metrics = {
            "loss": loss_sum / count,
            "grad_norm": _global_norm(grads),
            "lr": self.schedule(state.step),
            "tokens": jnp.sum(attention),
        }
        return self.apply_gradients(state, grads), metrics

    def apply_gradients(self, state: TrainState, grads: Any) -> TrainState:
        """The optimizer step: ``grads`` (shaped like the trainable part of the params)
        through clipping + AdamW, FALQON's update rule, then into the params (traceable;
        the train step and the benchmarks' single-layer steps use it)."""
        # melded layers: b's update through the rule (into b, or merged into the FP8 weights)
        updates, (opt_state, falqon_state) = self.transformation.update(
            grads, (state.opt_state, state.falqon_state), state.params)
        params = apply_updates(state.params, updates)
        # exactly the incoming state's dtypes: a state that changed dtype would make the
        # step's next call compile again
        return cast_like(TrainState(params, opt_state, falqon_state, state.step + 1), state)

    def _eval_sums(self, params, tokens, mask, attention):
        """``(loss_sum, token_count)`` on one batch."""
        logits = self.forward(params, tokens, attention)
        return token_loss_sum(logits, tokens, mask), jnp.sum(mask[:, 1:])
