"""The benchmarked train steps: settings, methods, one step per (method, shape) as
abstract inputs, and the analytic model FLOPs of each step."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from falqon_jax import rules, sharding
from falqon_jax.model import methods
from falqon_jax.model.config import LlamaConfig, load_card
from falqon_jax.model.llama import linear_shapes, plan_linears
from falqon_jax.model.methods import linear_method
from falqon_jax.train.config import PAPER, TrainConfig
from falqon_jax.train.trainer import Trainer, TrainState, combine, partition


def _falqon_bench_methods() -> dict[str, dict[str, str]]:
    """FALQON's update rules as bench methods, name -> ``TrainConfig`` settings: ``falqon``
    is the default rule, ``falqon_<rule>`` every other rule of :mod:`falqon_jax.rules`, and
    ``falqon_paper_<rounding>`` the paper's rule with its other roundings."""
    named = {"falqon" if rule.name == rules.DEFAULT_RULE else f"falqon_{rule.name}":
             {"rule": rule.name} for rule in rules.RULES.values()}
    for rounding in rules.ROUNDINGS[1:]:
        named[f"falqon_{rules.PAPER.name}_{rounding}"] = {"rule": rules.PAPER.name,
                                                          "rounding": rounding}
    return named


FALQON_RULES = _falqon_bench_methods()
METHOD_NAMES = (*FALQON_RULES, "lora", "fp8_lora", "qlora", "full")
DEFAULT_METHODS = ("falqon", "falqon_paper", "lora", "fp8_lora", "qlora", "full")


def _live_b(method: str) -> bool:
    """Whether a FALQON bench method or registry name adds ``(A x) b^T`` in the forward."""
    return bool(methods.get(registry_name(method)).source.b_in_forward)


def registry_name(method: str) -> str:
    """The :mod:`falqon_jax.model.methods` name of a bench method (FALQON rules need layers with
    or without a live ``b``)."""
    if method not in FALQON_RULES:
        return method
    return methods.falqon_method(b_in_forward=rules.get(FALQON_RULES[method]["rule"]).live_b)


class BenchError(ValueError):
    """A bad flag or an impossible configuration: reported in one line, exit status 2."""



# --------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class Preset:
    """Default sizes: LLaMA-7B shapes, or ``--small`` ones that run on a CPU in seconds."""

    shapes: tuple[tuple[int, int], ...]
    tokens: int
    rank: int
    model_card: str | None
    model_layers: int
    batch: int
    seq: int


FULL_PRESET = Preset(((4096, 4096), (11008, 4096)), 8192, 64, "llama-7b", 2, 4, 2048)
SMALL_PRESET = Preset(((256, 256),), 512, 16, "tiny", 2, 2, 256)


@dataclasses.dataclass(frozen=True)
class Settings(Preset):
    """Everything one benchmark run needs: the sizes of a :class:`Preset` (flags merged
    with the preset) and what no preset sets.

    ``shapes`` are linear-layer weight shapes ``(out, in)``; ``model_card`` is ``None``
    when no model rows are wanted; ``model_layers`` 0 keeps the card's layer count.
    """

    methods: tuple[str, ...]
    top_k: int
    remat: bool
    seed: int


def parse_methods(text: str) -> tuple[str, ...]:
    """``"falqon,lora"`` -> ``("falqon", "lora")``; ``BenchError`` for unknown names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise BenchError("--methods is empty; choose from " + ", ".join(METHOD_NAMES))
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown:
        raise BenchError(
            f"unknown method {unknown[0]!r} in --methods; choose from {', '.join(METHOD_NAMES)}"
        )
    return tuple(dict.fromkeys(names))


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``"4096x4096,11008x4096"`` -> ``((4096, 4096), (11008, 4096))`` (``OUTxIN``).

    ``"none"`` (or an empty string) gives no shapes. ``BenchError`` for anything else.
    """
    if text.strip().lower() in ("", "none"):
        return ()
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise BenchError(
                f"bad shape {item.strip()!r} in --shapes: expected OUTxIN with positive "
                "integers, e.g. 11008x4096"
            )
        shapes.append((int(parts[0]), int(parts[1])))
    return tuple(dict.fromkeys(shapes))


def resolve(args: argparse.Namespace) -> Settings:
    """Merge parsed flags with the preset and check them; ``BenchError`` if invalid."""
    preset = SMALL_PRESET if args.small else FULL_PRESET

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    card = pick(args.model_card, preset.model_card)
    if card is not None and card.strip().lower() == "none":
        card = None
    settings = Settings(
        methods=parse_methods(args.methods),
        shapes=preset.shapes if args.shapes is None else parse_shapes(args.shapes),
        tokens=pick(args.tokens, preset.tokens),
        rank=pick(args.rank, preset.rank),
        model_card=card,
        model_layers=pick(args.model_layers, preset.model_layers),
        batch=pick(args.batch, preset.batch),
        seq=pick(args.seq, preset.seq),
        top_k=args.top_k,
        remat=args.remat,
        seed=args.seed,
    )
    check_settings(settings)
    if not settings.shapes and settings.model_card is None:
        raise BenchError("nothing to benchmark: --shapes none and --model-card none")
    if settings.model_card is not None:
        model_config(settings)  # raises BenchError for an unknown card
    return settings


def check_settings(settings: Settings) -> None:
    """``BenchError`` for settings no benchmark can run (sizes, method/shape mismatches)."""
    for flag, value in (("--tokens", settings.tokens), ("--rank", settings.rank),
                        ("--batch", settings.batch), ("--seq", settings.seq),
                        ("--top-k", settings.top_k)):
        if value <= 0:
            raise BenchError(f"{flag} must be a positive integer, got {value}")
    if settings.model_layers < 0:
        raise BenchError(f"--model-layers must be >= 0, got {settings.model_layers}")
    for name in settings.methods:
        method = methods.get(registry_name(name))
        for out, in_features in settings.shapes:
            problem = method.check(out, in_features, settings.rank)
            if problem:
                raise BenchError(f"{name} cannot run shape {out}x{in_features}: {problem}")
            if name in FALQON_RULES and settings.top_k > out:
                raise BenchError(
                    f"--top-k {settings.top_k} exceeds out={out} of shape {out}x{in_features}"
                )


def model_config(settings: Settings) -> LlamaConfig:
    """The card's :class:`LlamaConfig` with ``num_layers`` replaced by ``--model-layers``."""
    assert settings.model_card is not None
    try:
        config = load_card(settings.model_card)
    except ValueError as err:
        raise BenchError(str(err)) from None
    if settings.model_layers:
        config = dataclasses.replace(config, num_layers=settings.model_layers)
    return config


# --------------------------------------------------------------------------------------
# Train steps: the trainer's own (falqon_jax.train.trainer), never a copy.


def train_config(method: str, settings: Settings) -> TrainConfig:
    """The training configuration of a bench method: the paper's optimizer and settings,
    this run's rank, top-k, batch, gradient checkpointing and bfloat16 compute; FALQON's
    rules as ``rule`` / ``rounding``."""
    base = dataclasses.replace(
        PAPER, model=settings.model_card or "llama-7b", data="bench", rank=settings.rank,
        top_k=settings.top_k, remat=settings.remat, batch_size=settings.batch,
        dtype="bfloat16", seed=settings.seed,
        method=methods.FALQON.name if method in FALQON_RULES else method)
    return dataclasses.replace(base, **FALQON_RULES.get(method, {}))


@dataclasses.dataclass
class Case:
    """One (method, shape) benchmark: a train step and its abstract inputs.

    ``step(state, *inputs)`` returns the new :class:`~falqon_jax.train.trainer.TrainState`
    followed by its outputs; the state (argument 0) is donated. ``state`` is the abstract
    (``ShapeDtypeStruct``) state, ``inputs`` the abstract per-step inputs, ``make_inputs(key)``
    concrete ones (for timing), ``tokens`` the tokens per step and ``model_flops`` the GEMM
    FLOPs of one step (see :func:`linear_flops`). ``trainer`` built the step.
    """

    method: str
    kind: str
    shape: str
    step: Callable[..., Any]
    state: Any
    inputs: tuple[jax.ShapeDtypeStruct, ...]
    make_inputs: Callable[[jax.Array], tuple[jax.Array, ...]]
    tokens: int
    model_flops: float
    extra: dict[str, Any]
    trainer: Trainer
    llama_config: LlamaConfig | None = None  # model cases: the architecture


def linear_case(method: str, out: int, in_features: int, settings: Settings) -> Case:
    """The train step of one ``(out, in)`` linear layer under ``method`` (see module doc):
    its forward and backward, then the trainer's optimizer step (:meth:`Trainer.
    apply_gradients`)."""
    impl = methods.get(registry_name(method))
    tokens, rank = settings.tokens, settings.rank
    w = jax.ShapeDtypeStruct((out, in_features), jnp.float32)
    params = jax.eval_shape(
        lambda w: impl.init(w, rank, alpha=16.0, key=jax.random.key(0), dtype=jnp.bfloat16), w
    )
    mask = impl.trainable(params)
    trainer = Trainer(train_config(method, settings), None, mask)
    state = jax.eval_shape(trainer.fresh_state, params)

    def step(state: TrainState, x: jax.Array, g: jax.Array):
        trainable, frozen = partition(state.params, mask)
        y, vjp = jax.vjp(lambda t, x: impl.apply(combine(t, frozen), x), trainable, x)
        grads, dx = vjp(g)
        return trainer.apply_gradients(state, grads), y, dx

    inputs = (
        jax.ShapeDtypeStruct((tokens, in_features), jnp.bfloat16),
        jax.ShapeDtypeStruct((tokens, out), jnp.bfloat16),
    )

    def make_inputs(key: jax.Array) -> tuple[jax.Array, ...]:
        keys = jax.random.split(key, len(inputs))
        return tuple(jax.random.normal(k, s.shape, jnp.float32).astype(s.dtype)
                     for k, s in zip(keys, inputs, strict=True))

    return Case(
        method=method,
        kind="linear",
        shape=f"{out}x{in_features}",
        step=step,
        state=state,
        inputs=inputs,
        make_inputs=make_inputs,
        tokens=tokens,
        model_flops=linear_flops(method, out, in_features, tokens, rank),
        extra={"rank": rank},
        trainer=trainer,
    )


def model_case(method: str, settings: Settings, mesh: Any = None) -> Case:
    """The trainer's step (:attr:`Trainer.step_fn`) on a LLaMA decoder stack under
    ``method`` (see module doc); ``mesh`` (axes ``data``, ``fsdp``) places the state and
    batch, e.g. on compile-only GPUs."""
    from falqon_jax.train.plan import abstract_step

    config = model_config(settings)
    train = train_config(method, settings)
    batch, seq = settings.batch, settings.seq
    if mesh is None:
        mesh = sharding.parse_mesh("fsdp=1", jax.devices()[:1])
    built = abstract_step(train, config, mesh, seq, batch)
    plan = plan_linears(config, linear_method(train), rank=settings.rank)

    def make_inputs(key: jax.Array) -> tuple[jax.Array, ...]:
        tokens = jax.random.randint(key, (batch, seq), 0, min(256, config.vocab_size),
                                    jnp.int32)
        return tokens, jnp.ones((batch, seq), jnp.float32), jnp.ones((batch, seq), jnp.int32)

    return Case(
        method=method,
        kind="model",
        shape=f"{settings.model_card}:{config.num_layers}L",
        step=built.trainer.step_fn,
        state=built.args[0],
        inputs=tuple(built.args[1:]),
        make_inputs=make_inputs,
        tokens=batch * seq,
        model_flops=model_flops(method, config, plan, batch, seq, settings.rank),
        extra={
            "rank": settings.rank,
            "batch": batch,
            "seq": seq,
            "layers": config.num_layers,
            "remat": settings.remat,
            "converted": [t for t in linear_shapes(config)
                          if getattr(plan, t) == registry_name(method)],
        },
        trainer=built.trainer,
        llama_config=config,
    )


def cases(settings: Settings) -> list[Case]:
    """All (method, shape) cases: linear shapes first, then the model, per method."""
    result = []
    for out, in_features in settings.shapes:
        for method in settings.methods:
            result.append(linear_case(method, out, in_features, settings))
    if settings.model_card is not None:
        for method in settings.methods:
            result.append(model_case(method, settings))
    return result


# --------------------------------------------------------------------------------------
# Model FLOPs.


def linear_flops(method: str, out: int, in_features: int, tokens: int, rank: int) -> float:
    """GEMM FLOPs of one train step of an ``(out, in)`` layer over ``tokens`` tokens.

    ``full``: forward, ``dL/dx`` and ``dL/dW`` (``6 T out in``). ``frozen``: forward and
    ``dL/dx`` (``4 T out in``). LoRA-style methods (``lora``, ``fp8_lora``, ``qlora``) add
    the six rank-``r`` adapter GEMMs, ``6 T r (in + out)``. ``falqon`` runs the forward on
    ``out + r`` rows, ``dL/dx`` on ``out`` rows and ``dL/db`` (``2 T out r``):
    ``4 T out in + 2 T r (in + out)``. A live ``b`` (``falqon``, ``falqon_visible_merge``)
    adds ``(A x) b^T`` forward and ``g b``, ``(g b) A`` backward (the last inside the FP8
    ``dL/dx`` GEMM against ``[W; A]``): ``2 T r (2 out + in)``.
    The top-k merge (``k r in``) is ignored.
    """
    t, o, i, r = float(tokens), float(out), float(in_features), float(rank)
    if method == "full":
        return 6 * t * o * i
    if method == "frozen":
        return 4 * t * o * i
    if methods.get(registry_name(method)).melded:  # a bench method or a registry name
        live = 2 * t * r * (2 * o + i) if _live_b(method) else 0.0
        return 4 * t * o * i + 2 * t * r * (i + o) + live
    if method in ("lora", "fp8_lora", "qlora"):
        return 4 * t * o * i + 6 * t * r * (i + o)
    raise ValueError(f"no FLOP model for method {method!r}")


def model_flops(
    method: str, config: LlamaConfig, plan: Any, batch: int, seq: int, rank: int
) -> float:
    """GEMM FLOPs of one train step of the decoder stack (no recomputation counted).

    Every linear layer as in :func:`linear_flops` (with its planned method), plus the
    attention score and value GEMMs, ``4 T seq hidden`` forward and twice that backward
    per layer (the full ``seq x seq`` product: the implementation does not skip the
    causally masked half). ``lm_head`` is ``frozen`` unless the method is ``full``.
    """
    tokens = batch * seq
    shapes = linear_shapes(config)
    per_layer = 0.0
    for target, (out, in_features) in shapes.items():
        if target == "lm_head":
            continue
        per_layer += linear_flops(getattr(plan, target), out, in_features, tokens, rank)
    attn_width = config.num_heads * config.head_dim
    per_layer += 12.0 * tokens * seq * attn_width
    head_method = "full" if method == "full" else "frozen"
    out, in_features = shapes["lm_head"]
    head = linear_flops(head_method, out, in_features, tokens, rank)
    return config.num_layers * per_layer + head

# A decoder layer's projections whose output its backward pass reads (q, k, v: attention;
# o: the residual stream the MLP's norm normalises; gate, up: silu(gate) * up). Under
# gradient checkpointing these are recomputed; down_proj's output only joins the residual
# stream, which the layer's output carries, so nothing needs it again.
OUTPUT_READ_BY_BACKWARD = ("q", "k", "v", "o", "gate", "up")


def minimum_fp8_flops(method: str, config: LlamaConfig, tokens: int, rank: int,
                      remat: bool) -> float:
    """The FP8 GEMM FLOPs one train step of the decoder stack cannot do without, per method
    (the seven projections converted, ``T`` tokens, rank ``r``; ``lm_head`` stays bf16):

    * FALQON, proxy rules: forward ``2 T (out + r) in`` per projection (the melded GEMM,
      which yields ``A x``); ``dL/dx`` ``2 T out in``; ``dL/db`` ``2 T out r``; with
      ``remat``, the recomputation of the outputs the backward reads
      (:data:`OUTPUT_READ_BY_BACKWARD`), ``2 T out in`` each -- ``Q(A x)`` is saved, so
      the recomputation needs no ``A`` row, and ``down_proj`` is not recomputed at all.
    * FALQON, live ``b``: the same, except that ``dL/dx`` runs on ``[g, g b]`` against the
      melded ``[W; A]`` (``2 T (out + r) in``) and the recomputed outputs need ``A x``
      again for ``(A x) b^T`` (``2 T (out + r) in`` each).
    * ``fp8_lora``: forward ``2 T out in + 2 T r (in + out)``; backward ``dL/dx``
      (``2 T out in + 2 T r in``), ``dB``, ``d(x A^T)`` and ``dA`` (``2 T r (2 out + in)``);
      with ``remat``, the forward again for the outputs the backward reads, and
      ``x A^T`` (``2 T r in``) for ``down_proj`` (``dB`` reads it).

    The bf16 GEMMs of a live ``b`` are not FP8 and not counted. ``ValueError`` for methods
    without FP8 GEMMs.
    """
    t, r = float(tokens), float(rank)
    total = 0.0
    for target, (out, in_features) in linear_shapes(config).items():
        if target == "lm_head":
            continue
        o, i = float(out), float(in_features)
        recompute = remat and target in OUTPUT_READ_BY_BACKWARD
        if methods.get(registry_name(method)).melded:
            rows = o + r if _live_b(method) else o  # of dL/dx and the recomputation
            total += 2 * t * (o + r) * i + 2 * t * rows * i + 2 * t * o * r
            total += 2 * t * rows * i if recompute else 0.0
        elif method == "fp8_lora":
            forward = 2 * t * o * i + 2 * t * r * (i + o)
            total += forward + 2 * t * o * i + 2 * t * r * i + 2 * t * r * (2 * o + i)
            total += forward if recompute else (2 * t * r * i if remat else 0.0)
        else:
            raise ValueError(f"{method} runs no FP8 GEMM")
    return config.num_layers * total


def minimum_bytes(case: Case) -> dict[str, float]:
    """A lower bound of the bytes one train step of a model case moves (``T`` tokens, from
    shapes), by part. It counts an ideal program of the same structure: every norm, cast,
    scaling, RoPE, SiLU and residual add fused into the GEMM or attention kernel beside it,
    so data moves only at GEMM and attention boundaries, each tensor written once and read
    once by each kernel that needs it.

    * ``weights``: every frozen leaf read once per pass that uses it, in its stored dtype:
      forward and ``dL/dx`` for the projections and ``lm_head``, and under ``remat`` once
      more for the projections whose output the backward reads
      (:data:`OUTPUT_READ_BY_BACKWARD`); of the embedding only its ``T`` rows; norms twice.
    * ``state``: every trainable leaf read by the same passes and written once, its
      gradient written and read once; the optimizer's and FALQON's state read and written
      once.
    * ``activations`` (compute dtype, ``H`` hidden, ``Q`` query and ``KV`` key/value
      widths, ``F`` intermediate), per layer and token -- forward
      ``6 H + 2 (Q + 2 KV) + 2 Q + 4 F``: the residual stream read by the q/k/v GEMM and
      ``o_proj``'s residual add, q/k/v written and read by attention, its output written
      and read by ``o_proj``, the residual written and read by gate/up and ``down``'s add,
      gate/up written and read by ``down``, the layer output written; the recomputation
      (``remat``) ``4 H + 2 (Q + 2 KV) + 2 Q + 2 F`` (all but ``down``); backward
      ``8 H + 6 F + 3 Q + 3 (Q + 2 KV)``: each of those tensors' gradients written and
      read, the values attention's, SwiGLU's and the norms' backward read; ``full`` adds
      the weight gradients' second reads of inputs and output gradients,
      ``4 H + (Q + 2 KV) + Q + 3 F``. Adapter gradients read what the ``dL/dx`` GEMMs read
      and add nothing. Outside the layers: the embedding's rows written, the head's input
      read twice, the logits and their gradient each written and read once (``4 V``).

    ``total`` is their sum, in bytes.
    """
    config = case.llama_config
    if config is None:
        raise ValueError("minimum_bytes needs a model case")
    weights = _minimum_weight_bytes(case)
    state = _minimum_state_bytes(case)
    activations = _minimum_activation_bytes(case, config)
    return {"weights": weights, "state": state, "activations": activations,
            "total": weights + state + activations}


def _nbytes(leaf: Any) -> float:
    return float(leaf.size * jnp.dtype(leaf.dtype).itemsize)


def _params_by_mask(case: Case, trainable: bool) -> list[tuple[tuple[Any, ...], Any]]:
    """``(path, leaf)`` of the trainable (or the frozen) parameters of ``case``."""
    leaves = jax.tree_util.tree_flatten_with_path(case.state.params)[0]
    mask = jax.tree.leaves(case.trainer.mask)
    return [pair for pair, keep in zip(leaves, mask, strict=True) if bool(keep) == trainable]


def _weight_passes(case: Case) -> Callable[[tuple[Any, ...]], float]:
    """How often one step reads a parameter at ``path``: forward and ``dL/dx`` (2), a
    projection whose output the backward reads once more under ``remat``; the embedding 0
    when untied (its ``T`` rows are counted apart)."""
    config, params = case.llama_config, case.state.params
    remat = bool(case.extra["remat"])
    projections = {f"{target}_proj": target for target in linear_shapes(config)}

    def passes(path: tuple[Any, ...]) -> float:
        names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
        target = next((projections[n] for n in names if n in projections), None)
        if target is not None:
            return 2.0 + (remat and target in OUTPUT_READ_BY_BACKWARD)
        if "lm_head" in names:
            return 2.0
        if "embed_tokens" in names:  # a gather, unless tied to the head
            return 0.0 if "lm_head" in params else 2.0
        return 2.0

    return passes


def _minimum_weight_bytes(case: Case) -> float:
    """The ``weights`` part of :func:`minimum_bytes`: frozen leaves, in bytes."""
    passes = _weight_passes(case)
    weights = 0.0
    for path, leaf in _params_by_mask(case, trainable=False):
        weights += _nbytes(leaf) * passes(path)
    params = case.state.params
    if "embed_tokens" in params:  # its T rows read (a gather)
        weights += float(case.tokens) * float(case.llama_config.hidden_size) * float(
            jnp.dtype(params["embed_tokens"].dtype).itemsize)
    return weights


def _minimum_state_bytes(case: Case) -> float:
    """The ``state`` part of :func:`minimum_bytes`: trainable leaves (read like weights,
    written once, their gradient written and read), the optimizer's and FALQON's state
    (read and written), in bytes."""
    passes = _weight_passes(case)
    trainable = 0.0
    for path, leaf in _params_by_mask(case, trainable=True):
        trainable += _nbytes(leaf) * (passes(path) + 1.0 + 2.0)  # passes, update; grad w + r
    return trainable + 2.0 * sum(
        _nbytes(leaf) for leaf in jax.tree.leaves((case.state.opt_state, case.state.falqon_state)))


def _minimum_activation_bytes(case: Case, config: LlamaConfig) -> float:
    """The ``activations`` part of :func:`minimum_bytes`, in bytes: per layer and token the
    forward, the recomputation (``remat``), the backward and ``full``'s weight gradients'
    reads, plus what runs outside the layers."""
    t = float(case.tokens)
    c = float(jnp.dtype(case.trainer.config.dtype).itemsize)
    h, f = float(config.hidden_size), float(config.intermediate_size)
    q = float(config.num_heads * config.head_dim)
    qkv = q + 2.0 * config.num_kv_heads * config.head_dim
    layer = 6 * h + 2 * qkv + 2 * q + 4 * f + 8 * h + 6 * f + 3 * q + 3 * qkv
    if case.extra["remat"]:
        layer += 4 * h + 2 * qkv + 2 * q + 2 * f
    if case.method == "full":
        layer += 4 * h + qkv + q + 3 * f
    outside = 3 * h + 4 * config.vocab_size
    return t * c * (config.num_layers * layer + outside)


# --------------------------------------------------------------------------------------
# Rows.


def base_row(case: Case, env: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": case.method,
        "kind": case.kind,
        "shape": case.shape,
        "tokens": case.tokens,
        **case.extra,
        "model_flops": case.model_flops,
        **env,
    }


