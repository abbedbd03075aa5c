"""Benchmarks of one training step per method: compiled-program counts and wall-clock speed.

Run ``python -m falqon_jax.bench SUBCOMMAND [flags]``:

* ``hlo``: lower and compile one train step per method -- for single linear layers and for
  a LLaMA-shaped decoder stack -- from abstract inputs (``jax.ShapeDtypeStruct``; nothing is
  allocated or executed) and report FP8 casts, GEMMs, XLA's memory analysis and cost
  analysis (the analysis of :func:`falqon_jax.hlo.analyze`, plus large copies/transposes).
* ``speed``: run the same train steps on the default device and report the median
  wall-clock time per step, tokens/s and model-FLOPs utilisation against the device's
  bf16 and FP8 peaks. On a CPU the numbers say nothing about FP8 speed (FP8 is emulated).
* ``accuracy``: fine-tune a real pretrained model (SmolLM2-135M-Instruct by default) with
  every method and seed, and report the held-out loss per method, the fraction of LoRA's
  improvement recovered and FALQON's other update rules (see :mod:`falqon_jax.accuracy`).

Methods (``--methods``): ``falqon`` (FALQON's default update rule), ``falqon_paper``,
``falqon_reference``, ``falqon_visible_merge``, ``falqon_paper_stochastic``,
``falqon_paper_feedback`` (its other rules, :data:`FALQON_RULES`), ``lora``, ``fp8_lora``,
``qlora``, ``full`` (see :mod:`falqon_jax.methods`). ``--json FILE`` writes a JSON list
with one object per (method, shape) row; the file is rewritten after every row, so an
interrupted run keeps the rows it finished.

What one "train step" is:

* Linear layer ``(out, in)`` with ``T`` tokens: the layer's share of a network's step. The
  step receives the input ``x`` ``(T, in)`` and the upstream gradient ``g = dL/dy``
  ``(T, out)`` (both bfloat16), returns ``y`` and ``dL/dx`` (both needed by the
  neighbouring layers, so neither GEMM can be optimised away), takes gradients of the
  trainable leaves only, and applies gradient clipping + AdamW to them -- plus, for the
  FALQON methods, :func:`falqon_jax.optax.falqon_update` with their rule (for the merging
  rules the proxy buffer and the top-k row merge into the FP8 weight). Params and optimizer
  state are donated.
* Model: a LLaMA decoder built from a model card (``--model-card``, default ``llama-7b``)
  with ``--model-layers`` decoder layers (default 2), next-token cross-entropy on a
  ``(batch, seq)`` token batch, the same optimizer. Adapter methods convert the seven
  decoder projections; embeddings, norms and ``lm_head`` stay frozen (``full`` trains all).

Counting conventions: FP8 casts and GEMMs are counted in the program *text*. The decoder
layers are one ``scan``, so for a model row every count -- and XLA's cost-analysis
``flops``, which also counts a loop body once -- covers one decoder layer plus what sits
outside the scan (``lm_head``, the loss, the optimizer and FALQON's merges). The analytic
``model_flops`` (:func:`model_flops`) covers the whole step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from falqon_jax import hlo, methods
from falqon_jax.cli import OneLineParser
from falqon_jax.config import LlamaConfig, load_card
from falqon_jax.llama import Llama, abstract_params, linear_shapes, plan_linears, trainable_mask
from falqon_jax.optax import falqon_update
from falqon_jax.train_config import METHODS as TRAIN_METHODS

# FALQON's update rules as bench methods: name -> falqon_update settings. "falqon" is the
# default rule (a live b); the others are the paper's rule, the authors' code, ...
FALQON_RULES: dict[str, dict[str, str]] = {
    "falqon": {"rule": "visible"},
    "falqon_paper": {"rule": "paper"},
    "falqon_reference": {"rule": "reference"},
    "falqon_visible_merge": {"rule": "visible_merge"},
    "falqon_paper_stochastic": {"rule": "paper", "rounding": "stochastic"},
    "falqon_paper_feedback": {"rule": "paper", "rounding": "feedback"},
}
METHOD_NAMES = (*FALQON_RULES, "lora", "fp8_lora", "qlora", "full")
DEFAULT_METHODS = ("falqon", "falqon_paper", "lora", "fp8_lora", "qlora", "full")


def _live_b(method: str) -> bool:
    """Whether a FALQON bench method or registry name adds ``(A x) b^T`` in the forward."""
    return bool(methods.get(registry_name(method)).source.b_in_forward)


def registry_name(method: str) -> str:
    """The :mod:`falqon_jax.methods` name of a bench method (FALQON rules need layers with
    or without a live ``b``)."""
    if method not in FALQON_RULES:
        return method
    from falqon_jax.optax import rule_uses_live_b

    return methods.falqon_method(b_in_forward=rule_uses_live_b(FALQON_RULES[method]["rule"]))
CPU_NOTE = "CPU wall-clock: not indicative of FP8 speed (FP8 is emulated on CPU)"

# Dense peak throughput in TFLOP/s, (bf16, fp8) per device kind; ``None`` where the device
# has no FP8 tensor cores. Matched in order against ``jax.Device.device_kind`` (so the more
# specific names come first). Vendor datasheet numbers without structured sparsity.
PEAK_TFLOPS: tuple[tuple[str, float, float | None], ...] = (
    ("H100 PCIe", 756.0, 1513.0),
    ("H100 NVL", 835.0, 1671.0),
    ("H200 NVL", 835.0, 1671.0),
    ("GH200", 989.0, 1979.0),
    ("H200", 989.0, 1979.0),  # H200 SXM
    ("H100", 989.0, 1979.0),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250.0, 4500.0),
    ("L40S", 362.0, 733.0),
    ("L4", 121.0, 242.5),
    ("A100", 312.0, None),
)


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
class Settings:
    """Everything one benchmark run needs (flags merged with the preset).

    ``shapes`` are linear-layer weight shapes ``(out, in)``; ``model_card`` is ``None``
    when no model rows are wanted; ``model_layers`` 0 keeps the card's layer count.
    """

    methods: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    tokens: int
    rank: int
    model_card: str | None
    model_layers: int
    batch: int
    seq: int
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
    for flag, value in (("--tokens", settings.tokens), ("--rank", settings.rank),
                        ("--batch", settings.batch), ("--seq", settings.seq),
                        ("--top-k", settings.top_k)):
        if value <= 0:
            raise BenchError(f"{flag} must be a positive integer, got {value}")
    if settings.model_layers < 0:
        raise BenchError(f"--model-layers must be >= 0, got {settings.model_layers}")
    if not settings.shapes and settings.model_card is None:
        raise BenchError("nothing to benchmark: --shapes none and --model-card none")
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
    if settings.model_card is not None:
        model_config(settings)  # raises BenchError for an unknown card
    return settings


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
# Train steps.


def make_optimizer() -> optax.GradientTransformation:
    """The paper's optimizer: global-norm clipping at 3.0, then AdamW (lr 2e-3, beta2 0.999,
    no weight decay). Applied to the trainable leaves only."""
    return optax.chain(
        optax.clip_by_global_norm(3.0),
        optax.adamw(2e-3, b1=0.9, b2=0.999, weight_decay=0.0),
    )


def _is_none(node: object) -> bool:
    return node is None


def partition(params: Any, mask: Any) -> tuple[Any, Any]:
    """Split ``params`` by a bool ``mask`` into ``(trainable, frozen)``; gaps are ``None``."""
    trainable = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`partition`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=_is_none)


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates`` leaf by leaf, skipping ``None`` updates, keeping each dtype.

    FALQON's ``w8`` update is a :class:`falqon_jax.optax.RowMerge` (a k-row scatter).
    """
    return jax.tree.map(
        lambda p, u: p if u is None else jnp.asarray(p + u).astype(jnp.asarray(p).dtype),
        params,
        updates,
        is_leaf=_is_none,
    )


@dataclasses.dataclass
class Case:
    """One (method, shape) benchmark: a step function and its abstract inputs.

    ``step(params, opt_state, merge_state, *inputs)`` returns the new
    ``(params, opt_state, merge_state)`` followed by its outputs; the first three arguments
    are donated. ``state`` holds the three abstract (``ShapeDtypeStruct``) trees,
    ``inputs`` the abstract per-step inputs, ``tokens`` the tokens per step and
    ``model_flops`` the GEMM FLOPs of one step (see :func:`linear_flops`).
    """

    method: str
    kind: str
    shape: str
    step: Callable[..., Any]
    state: tuple[Any, Any, Any]
    inputs: tuple[jax.ShapeDtypeStruct, ...]
    tokens: int
    model_flops: float
    extra: dict[str, Any]


def _abstract_opt_states(
    params: Any, mask: Any, method: str, top_k: int
) -> tuple[optax.GradientTransformation, Any, optax.GradientTransformation | None, Any]:
    optimizer = make_optimizer()
    trainable, _ = partition(params, mask)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    merge = falqon_update(top_k, **FALQON_RULES[method]) if method in FALQON_RULES else None
    merge_state = jax.eval_shape(merge.init, params) if merge is not None else ()
    return optimizer, opt_state, merge, merge_state


def _finish_step(
    optimizer: optax.GradientTransformation,
    merge: optax.GradientTransformation | None,
    params: Any,
    trainable: Any,
    grads: Any,
    opt_state: Any,
    merge_state: Any,
) -> tuple[Any, Any, Any]:
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    if merge is not None:  # b's update -> top-k row merges into the FP8 weights
        updates, merge_state = merge.update(updates, merge_state, params)
    return apply_updates(params, updates), opt_state, merge_state


def linear_case(method: str, out: int, in_features: int, settings: Settings) -> Case:
    """The train step of one ``(out, in)`` linear layer under ``method`` (see module doc)."""
    impl = methods.get(registry_name(method))
    tokens, rank = settings.tokens, settings.rank
    w = jax.ShapeDtypeStruct((out, in_features), jnp.float32)
    params = jax.eval_shape(
        lambda w: impl.init(w, rank, alpha=16.0, key=jax.random.key(0), dtype=jnp.bfloat16), w
    )
    mask = impl.trainable(params)
    optimizer, opt_state, merge, merge_state = _abstract_opt_states(
        params, mask, method, settings.top_k
    )

    def step(params: Any, opt_state: Any, merge_state: Any, x: jax.Array, g: jax.Array):
        trainable, frozen = partition(params, mask)
        y, vjp = jax.vjp(lambda t, x: impl.apply(combine(t, frozen), x), trainable, x)
        grads, dx = vjp(g)
        params, opt_state, merge_state = _finish_step(
            optimizer, merge, params, trainable, grads, opt_state, merge_state
        )
        return params, opt_state, merge_state, y, dx

    inputs = (
        jax.ShapeDtypeStruct((tokens, in_features), jnp.bfloat16),
        jax.ShapeDtypeStruct((tokens, out), jnp.bfloat16),
    )
    return Case(
        method=method,
        kind="linear",
        shape=f"{out}x{in_features}",
        step=step,
        state=(params, opt_state, merge_state),
        inputs=inputs,
        tokens=tokens,
        model_flops=linear_flops(method, out, in_features, tokens, rank),
        extra={"rank": rank},
    )


def model_case(method: str, settings: Settings) -> Case:
    """The train step of a LLaMA decoder stack under ``method`` (see module doc)."""
    config = model_config(settings)
    plan = plan_linears(config, registry_name(method), rank=settings.rank)
    module = Llama(config, plan, jnp.bfloat16, remat=settings.remat)
    params = abstract_params(module)
    mask = trainable_mask(params, plan)
    optimizer, opt_state, merge, merge_state = _abstract_opt_states(
        params, mask, method, settings.top_k
    )

    def loss_fn(trainable: Any, frozen: Any, tokens: jax.Array) -> jax.Array:
        logits = module.apply({"params": combine(trainable, frozen)}, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return -jnp.mean(picked)

    def step(params: Any, opt_state: Any, merge_state: Any, tokens: jax.Array):
        trainable, frozen = partition(params, mask)
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, tokens)
        params, opt_state, merge_state = _finish_step(
            optimizer, merge, params, trainable, grads, opt_state, merge_state
        )
        return params, opt_state, merge_state, loss

    batch, seq = settings.batch, settings.seq
    layers = config.num_layers
    return Case(
        method=method,
        kind="model",
        shape=f"{settings.model_card}:{layers}L",
        step=step,
        state=(params, opt_state, merge_state),
        inputs=(jax.ShapeDtypeStruct((batch, seq), jnp.int32),),
        tokens=batch * seq,
        model_flops=model_flops(method, config, plan, batch, seq, settings.rank),
        extra={
            "rank": settings.rank,
            "batch": batch,
            "seq": seq,
            "layers": layers,
            "remat": settings.remat,
            "converted": [t for t in linear_shapes(config)
                          if getattr(plan, t) == registry_name(method)],
        },
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
    adds ``(A x) b^T`` forward and ``g b``, ``(g b) A`` backward: ``2 T r (2 out + in)``.
    The top-k merge (``k r in``) is ignored.
    """
    t, o, i, r = float(tokens), float(out), float(in_features), float(rank)
    if method == "full":
        return 6 * t * o * i
    if method == "frozen":
        return 4 * t * o * i
    if method.startswith("falqon"):  # a bench method or a FALQON registry name
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


# --------------------------------------------------------------------------------------
# Environment.


def environment() -> dict[str, Any]:
    """Backend, device kind, JAX/jaxlib versions and the host CPU (for every row)."""
    import jaxlib

    device = jax.devices()[0]
    return {
        "backend": device.platform,
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "host_cpu": _cpu_model(),
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_flops(device_kind: str) -> tuple[float | None, float | None]:
    """``(bf16, fp8)`` dense peak FLOP/s for a device kind; ``None`` when unknown/absent."""
    for name, bf16, fp8_peak in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return bf16 * 1e12, (None if fp8_peak is None else fp8_peak * 1e12)
    return None, None


# --------------------------------------------------------------------------------------
# Rows.


def _base_row(case: Case, env: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": case.method,
        "kind": case.kind,
        "shape": case.shape,
        "tokens": case.tokens,
        **case.extra,
        "model_flops": case.model_flops,
        **env,
    }


_HLO_LAYOUT_OP = re.compile(r"= [a-z0-9]+\[([0-9,]*)\][^ ]* (copy|transpose)\(")


def count_layout_ops(compiled_text: str, large_elements: int) -> dict[str, int]:
    """Copies and transposes of tensors with >= ``large_elements`` elements in optimized
    HLO text (fusion bodies included): dense data movement such as a copy of a weight
    around an in-place update, or a weight transposed for a GEMM layout."""
    counts = {"copy": 0, "transpose": 0}
    for match in _HLO_LAYOUT_OP.finditer(compiled_text):
        size = math.prod(int(d) for d in match.group(1).split(",") if d)
        if size >= large_elements:
            counts[match.group(2)] += 1
    return {"compiled_copies_large": counts["copy"],
            "compiled_transposes_large": counts["transpose"]}


def hlo_row(
    case: Case, env: dict[str, Any], large_elements: int | None, dump: Path | None = None
) -> dict[str, Any]:
    """Lower and compile ``case`` from abstract inputs and collect the counts.

    The same analysis as :func:`falqon_jax.hlo.analyze` (its counters, memory and cost
    analysis) from one compilation, plus :func:`count_layout_ops`; ``dump`` (a folder)
    receives the lowered StableHLO and the optimized HLO text of the case.

    ``fp8_casts``/``gemms``/... come from the lowered StableHLO (backend-independent);
    ``compiled_*`` from the backend's optimized HLO. ``large_elements`` (default
    ``2 * tokens * max(rank, 16)``, above every ``tokens x rank`` tensor) sets which casts
    count as large.
    """
    if large_elements is None:
        large_elements = 2 * case.tokens * max(case.extra["rank"], 16)
    start = time.perf_counter()
    lowered = jax.jit(case.step, donate_argnums=(0, 1, 2)).lower(*case.state, *case.inputs)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    lowered_text, compiled_text = lowered.as_text(), compiled.as_text()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    cost = cost or {}
    row = _base_row(case, env)
    row.update(hlo.count_lowered(lowered_text, large_elements).as_dict())
    compiled_counts = hlo.count_compiled(compiled_text, large_elements).as_dict()
    row.update({f"compiled_{k}": v for k, v in compiled_counts.items()})
    row.update(count_layout_ops(compiled_text, large_elements))
    row.update(
        {
            "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)),
            "argument_bytes": int(getattr(memory, "argument_size_in_bytes", -1)),
            "output_bytes": int(getattr(memory, "output_size_in_bytes", -1)),
            "alias_bytes": int(getattr(memory, "alias_size_in_bytes", -1)),
            "flops": float(cost.get("flops", -1.0)),
            "bytes_accessed": float(cost.get("bytes accessed", -1.0)),
            "large_elements": large_elements,
            "compile_s": round(seconds, 3),
        }
    )
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        stem = f"{case.method}_{case.shape.replace(':', '_')}"
        (dump / f"{stem}.lowered.mlir").write_text(lowered_text)
        (dump / f"{stem}.compiled.hlo").write_text(compiled_text)
    return row


def synthetic(abstract: Any, key: jax.Array) -> Any:
    """Concrete arrays for an abstract pytree, made on the device in one jitted call.

    Float leaves (FP8 included) get small random values (``N(0, 0.02)``, cast), integer
    leaves random values in ``[0, 16)`` (valid NF4 codes and dynamic-code indices), so the
    work of a step is that of a real model; scales are ``2e-4``-ish positives.
    """
    leaves, treedef = jax.tree.flatten(abstract)

    def make(key: jax.Array) -> list[jax.Array]:
        keys = jax.random.split(key, max(len(leaves), 1))
        made = []
        for k, leaf in zip(keys, leaves, strict=False):
            dtype = jnp.dtype(leaf.dtype)
            if jnp.issubdtype(dtype, jnp.floating):
                value = 0.02 * jax.random.normal(k, leaf.shape, jnp.float32)
                if leaf.shape == ():
                    value = jnp.abs(value) / 100 + 1e-4
                made.append(value.astype(dtype))
            elif jnp.issubdtype(dtype, jnp.integer):
                made.append(jax.random.randint(k, leaf.shape, 0, 16).astype(dtype))
            else:
                made.append(jnp.zeros(leaf.shape, dtype))
        return made

    return jax.tree.unflatten(treedef, jax.jit(make)(key))


def speed_row(
    case: Case, env: dict[str, Any], *, repeats: int, warmup: int, seed: int
) -> dict[str, Any]:
    """Run ``case`` on the default device: median seconds per step after ``warmup`` steps.

    Params, optimizer state and inputs are synthetic (:func:`synthetic`; token ids below
    256): the work of a step does not depend on the values, and nothing slow (FALQON's SVD
    init of every layer) runs before the timing. The first call includes compilation and
    is reported as ``first_step_s``.
    """
    key = jax.random.key(seed)
    params, opt_state, merge_state = case.state
    state = list(synthetic((params, opt_state, merge_state), key))
    inputs = []
    for i, spec in enumerate(case.inputs):
        k = jax.random.fold_in(key, 1000 + i)
        if jnp.issubdtype(spec.dtype, jnp.integer):
            inputs.append(jax.random.randint(k, spec.shape, 0, 256, spec.dtype))
        else:
            inputs.append((jax.random.normal(k, spec.shape, jnp.float32)).astype(spec.dtype))
    step = jax.jit(case.step, donate_argnums=(0, 1, 2))

    def run_once() -> float:
        nonlocal state
        start = time.perf_counter()
        result = step(*state, *inputs)
        jax.block_until_ready(result)
        seconds = time.perf_counter() - start
        state = list(result[:3])
        return seconds

    compile_start = time.perf_counter()
    first = run_once()
    compile_s = time.perf_counter() - compile_start
    del first
    for _ in range(max(warmup - 1, 0)):
        run_once()
    times = [run_once() for _ in range(repeats)]
    del state
    median = statistics.median(times)
    bf16_peak, fp8_peak = peak_flops(env["device"]) if env["backend"] == "gpu" else (None, None)
    achieved = case.model_flops / median
    row = _base_row(case, env)
    row.update(
        {
            "step_time_s": median,
            "step_times_s": times,
            "tokens_per_s": case.tokens / median,
            "achieved_tflops": achieved / 1e12,
            "mfu_bf16": None if bf16_peak is None else achieved / bf16_peak,
            "mfu_fp8": None if fp8_peak is None else achieved / fp8_peak,
            "first_step_s": round(compile_s, 3),
            "repeats": repeats,
            "warmup": warmup,
        }
    )
    if env["backend"] == "cpu":
        row["note"] = CPU_NOTE
    return row


# --------------------------------------------------------------------------------------
# Output.


def write_json(path: Path | None, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as a JSON list (atomically: a temporary file, then a rename)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    tmp.replace(path)


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f}" if n >= 0 else "n/a"


HLO_HEADER = (
    f"{'method':<9} {'shape':<16} {'casts':>5} {'large':>5} {'gemms':>5} {'fp8g':>4} "
    f"{'c.casts':>7} {'c.copy':>6} {'temp MB':>9} {'arg MB':>9} {'GFLOP':>10}"
)
SPEED_HEADER = (
    f"{'method':<9} {'shape':<16} {'step s':>10} {'tokens/s':>11} {'TFLOP/s':>8} "
    f"{'mfu_bf16':>8} {'mfu_fp8':>8}"
)


def format_hlo(row: dict[str, Any]) -> str:
    """One table line of an ``hlo`` row."""
    return (
        f"{row['method']:<9} {row['shape']:<16} {row['fp8_casts']:>5} "
        f"{row['fp8_casts_large']:>5} {row['gemms']:>5} {row['fp8_gemms']:>4} "
        f"{row['compiled_fp8_casts']:>7} {row['compiled_copies_large']:>6} "
        f"{_mb(row['temp_bytes']):>9} "
        f"{_mb(row['argument_bytes']):>9} {row['flops'] / 1e9:>10.1f}"
    )


def format_speed(row: dict[str, Any]) -> str:
    """One table line of a ``speed`` row."""

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    return (
        f"{row['method']:<9} {row['shape']:<16} {row['step_time_s']:>10.4f} "
        f"{row['tokens_per_s']:>11.0f} {row['achieved_tflops']:>8.2f} "
        f"{pct(row['mfu_bf16']):>8} {pct(row['mfu_fp8']):>8}"
    )


def _banner(command: str, settings: Settings, env: dict[str, Any]) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"falqon_jax.bench {command}: {stamp}; jax {env['jax_version']} "
        f"(jaxlib {env['jaxlib_version']}), backend {env['backend']} ({env['device']}), "
        f"host CPU {env['host_cpu']}",
        flush=True,
    )
    model = (
        "none" if settings.model_card is None
        else f"{settings.model_card} x{model_config(settings).num_layers} layers, "
        f"batch {settings.batch} x seq {settings.seq}" + (", remat" if settings.remat else "")
    )
    shapes = ", ".join(f"{o}x{i}" for o, i in settings.shapes) or "none"
    print(
        f"linear shapes (out x in): {shapes}; tokens {settings.tokens}; rank {settings.rank}; "
        f"top-k {settings.top_k}; model: {model}",
        flush=True,
    )


def run_hlo(args: argparse.Namespace) -> int:
    """The ``hlo`` subcommand."""
    settings = resolve(args)
    if args.large_elements is not None and args.large_elements <= 0:
        raise BenchError(f"--large-elements must be positive, got {args.large_elements}")
    env = environment()
    _banner("hlo", settings, env)
    print("casts/large/gemms/fp8g: lowered StableHLO; c.casts, c.copy (large copies): "
          f"compiled HLO ({env['backend']}); model rows count one decoder layer (scan body)",
          flush=True)
    print(HLO_HEADER, flush=True)
    rows: list[dict[str, Any]] = []
    for case in cases(settings):
        row = hlo_row(case, env, args.large_elements, args.dump_hlo)
        rows.append(row)
        write_json(args.json, rows)
        print(format_hlo(row), flush=True)
    return 0


def run_speed(args: argparse.Namespace) -> int:
    """The ``speed`` subcommand."""
    settings = resolve(args)
    if args.repeats <= 0 or args.warmup < 0:
        raise BenchError("--repeats must be positive and --warmup non-negative")
    env = environment()
    _banner("speed", settings, env)
    if env["backend"] == "cpu":
        print(f"NOTE: {CPU_NOTE}", flush=True)
    print(f"median of {args.repeats} steps after {args.warmup} warm-up step(s)", flush=True)
    print(SPEED_HEADER, flush=True)
    rows: list[dict[str, Any]] = []
    for case in cases(settings):
        row = speed_row(case, env, repeats=args.repeats, warmup=args.warmup, seed=settings.seed)
        rows.append(row)
        write_json(args.json, rows)
        print(format_speed(row), flush=True)
    return 0


# --------------------------------------------------------------------------------------
# Command line.


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)}; also "
        f"{','.join(m for m in METHOD_NAMES if m not in DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--shapes", default=None,
        help="comma-separated linear weight shapes OUTxIN, or 'none' "
        "(default 4096x4096,11008x4096; --small: 256x256)",
    )
    parser.add_argument("--tokens", type=_int, default=None,
                        help="tokens per linear-layer step (default 8192; --small: 512)")
    parser.add_argument("--rank", type=_int, default=None,
                        help="adapter rank (default 64; --small: 16)")
    parser.add_argument(
        "--model-card", "--full-model", dest="model_card", default=None,
        help="model card for the model rows, or 'none' (default llama-7b; --small: tiny)",
    )
    parser.add_argument("--model-layers", type=_int, default=None,
                        help="decoder layers of the model rows; 0 = the card's count (default 2)")
    parser.add_argument("--batch", type=_int, default=None,
                        help="model batch size (default 4; --small: 2)")
    parser.add_argument("--seq", type=_int, default=None,
                        help="model sequence length (default 2048; --small: 256)")
    parser.add_argument("--top-k", type=_int, default=10,
                        help="FALQON rows merged per matrix per step (default 10)")
    parser.add_argument("--remat", action="store_true",
                        help="recompute each decoder layer in the backward pass (model rows)")
    parser.add_argument("--small", action="store_true",
                        help="small preset for CPUs: 256x256, 512 tokens, rank 16, tiny model")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (speed)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="write the rows as a JSON list to FILE")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m falqon_jax.bench`` argument parser (one subparser per subcommand)."""
    parser = OneLineParser(
        prog="python -m falqon_jax.bench",
        description="Benchmarks of one training step per method (falqon, lora, fp8_lora, "
        "qlora, full).",
    )
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{hlo,speed,accuracy,collectives}")

    hlo_parser = sub.add_parser(
        "hlo", help="compile-only: FP8 casts, GEMMs, memory and cost analysis per method",
        description="Lower and compile one train step per method from abstract shapes "
        "(nothing is executed) and count FP8 casts, GEMMs, memory and FLOPs.",
    )
    _add_common(hlo_parser)
    hlo_parser.add_argument(
        "--large-elements", type=_int, default=None,
        help="casts of tensors with at least this many elements count as large "
        "(default 2 * tokens * max(rank, 16))",
    )
    hlo_parser.add_argument(
        "--dump-hlo", type=Path, default=None, metavar="DIR",
        help="write each case's lowered StableHLO and optimized HLO text into DIR",
    )
    hlo_parser.set_defaults(run=run_hlo)

    speed_parser = sub.add_parser(
        "speed", help="wall-clock per train step, tokens/s and MFU per method",
        description="Time one train step per method on the default device (median after "
        "warm-up). On a CPU the numbers are not indicative of FP8 speed.",
    )
    _add_common(speed_parser)
    speed_parser.add_argument("--repeats", type=_int, default=5,
                              help="timed steps; the median is reported (default 5)")
    speed_parser.add_argument("--warmup", type=_int, default=2,
                              help="untimed steps first, including compilation (default 2)")
    speed_parser.set_defaults(run=run_speed)

    accuracy_parser = sub.add_parser(
        "accuracy", help="held-out loss per method after fine-tuning a pretrained model",
        description="Fine-tune a pretrained LLaMA (default: SmolLM2-135M-Instruct from "
        "../shared, converted into ~/.cache/falqon-jax) with every method and seed (same "
        "steps, rank, lr, batches, held-out split) and with FALQON's other update rules; "
        "report the held-out loss, the fraction of LoRA's improvement each recovers and "
        "wall time. See falqon_jax.accuracy.",
    )
    add = accuracy_parser.add_argument
    add("--data", type=Path, required=True, help="Alpaca JSON / JSONL instruction data")
    add("--model", type=Path, default=None,
        help="Hugging Face LLaMA directory (default: SmolLM2-135M-Instruct, converted once)")
    add("--tokenizer", default=None,
        help="tokenizer directory, or 'char' (default: the model directory's)")
    add("--out", type=Path, default=Path("runs/accuracy"),
        help="directory of every run (reused/resumed when rerun; default runs/accuracy)")
    add("--methods", default=None,
        help="comma-separated methods (default lora,fp8_lora,qlora,falqon)")
    add("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    add("--ablation-seeds", default=None,
        help="seeds of FALQON's other rules and ablations (default: --seeds)")
    add("--no-ablations", dest="ablations", action="store_false", default=None,
        help="skip FALQON's other rules and ablations")
    add("--steps", type=_int, default=None, help="fine-tuning steps per run (default 40)")
    add("--lr", type=float, default=None, help="fine-tuning lr, every method (default 2e-3)")
    add("--rank", type=_int, default=None, help="adapter rank (default 16)")
    add("--top-k", type=_int, default=None, help="FALQON's top-k (default 10)")
    add("--batch-size", type=_int, default=None, help="examples per step (default 8)")
    add("--source-len", type=_int, default=None, help="prompt tokens (default 48)")
    add("--target-len", type=_int, default=None, help="response tokens (default 64)")
    add("--eval-size", type=_int, default=None, help="held-out examples (default 100)")
    add("--quick", action="store_true",
        help="smoke test: 2 fine-tuning steps, seed 0, falqon and lora, no ablations "
        "(explicit flags still win)")
    add("--json", type=Path, default=None, metavar="FILE",
        help="write the rows as a JSON list (rewritten after every method)")
    add("--plot", type=Path, default=None, metavar="PNG",
        help="write a bar chart of held-out loss per method (needs matplotlib)")
    accuracy_parser.set_defaults(run=run_accuracy)

    coll = sub.add_parser(
        "collectives", help="collectives per layer of the sharded train step (compile only)",
        description="Compile the train step of a model card over a device mesh (simulated on "
        "a CPU; abstract weights) and count its collectives per decoder layer, as the SPMD "
        "partitioner emits them and as the backend compiles them.",
    )
    add = coll.add_argument
    add("--model", default="tiny", help="model card (default tiny)")
    add("--method", default="falqon", choices=TRAIN_METHODS,
        help="method (default falqon, its default rule)")
    add("--mesh", default="fsdp=8", help="data=D,fsdp=F (default fsdp=8)")
    add("--rank", type=_int, default=16, help="adapter rank (default 16)")
    add("--batch-size", type=_int, default=16, help="rows per step (default 16)")
    add("--seq", type=_int, default=64, help="tokens per row (default 64)")
    add("--grad-accum", type=_int, default=1, help="micro-batches per step (default 1)")
    add("--remat", action=argparse.BooleanOptionalAction, default=True,
        help="gradient checkpointing as in training (default on)")
    add("--json", type=Path, default=None, metavar="FILE", help="write the row as JSON")
    coll.set_defaults(run=run_collectives)
    return parser


def _seed_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        seeds = tuple(dict.fromkeys(int(t) for t in text.split(",") if t.strip()))
    except ValueError:
        raise BenchError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise BenchError(f"{flag} must name at least one non-negative seed, got {text!r}")
    return seeds


def run_accuracy(args: argparse.Namespace) -> int:
    """The ``accuracy`` subcommand: see :mod:`falqon_jax.accuracy`."""
    from falqon_jax import accuracy

    quick = {"steps": 2, "seeds": (0,), "ablation_seeds": (0,),
             "methods": ("falqon", "lora"), "ablations": False} if args.quick else {}
    values: dict[str, Any] = {"data": args.data, "out": args.out, "model": args.model,
                              "tokenizer": args.tokenizer, **quick}
    if args.methods is not None:
        values["methods"] = parse_methods(args.methods)
    if args.seeds is not None:
        values["seeds"] = _seed_list(args.seeds, "--seeds")
    values.setdefault("ablation_seeds", values.get("seeds", (0, 1, 2)))
    if args.ablation_seeds is not None:
        values["ablation_seeds"] = _seed_list(args.ablation_seeds, "--ablation-seeds")
    for name in ("ablations", "steps", "lr", "rank", "top_k", "batch_size", "source_len",
                 "target_len", "eval_size"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    settings = accuracy.StudySettings(**values)
    for name in ("steps", "rank", "top_k", "batch_size", "source_len", "target_len",
                 "eval_size"):
        if getattr(settings, name) <= 0:
            flag = "--" + name.replace("_", "-")
            raise BenchError(f"{flag} must be a positive integer, got {getattr(settings, name)}")
    env = environment()

    def on_row(rows: list[dict[str, Any]]) -> None:
        write_json(args.json, [r | env for r in rows])
        if args.plot is not None:
            accuracy.plot(rows, args.plot)

    try:
        rows = accuracy.run_study(settings, on_row=on_row)
    except accuracy.StudyError as err:
        raise BenchError(str(err)) from None
    print(accuracy.format_table(rows))
    if args.plot is not None and accuracy.plot(rows, args.plot) is None:
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 0


def run_collectives(args: argparse.Namespace) -> int:
    """The ``collectives`` subcommand: re-runs itself in a fresh interpreter that simulates
    the mesh's devices on a CPU and dumps the partitioned HLO; that child does the work."""
    from falqon_jax import sharding, step_collectives

    try:
        devices = math.prod(sharding.mesh_sizes(args.mesh, 1 << 20).values())
    except sharding.MeshError as err:
        raise BenchError(str(err)) from None
    for flag in ("rank", "batch_size", "seq", "grad_accum"):
        if getattr(args, flag) <= 0:
            raise BenchError(f"--{flag.replace('_', '-')} must be positive")
    if os.environ.get(step_collectives.DUMP_ENV) is None:  # the same flags, in the child
        with tempfile.TemporaryDirectory() as dump:
            env = step_collectives.child_environment(devices, Path(dump))
            return subprocess.run([sys.executable, "-m", "falqon_jax.bench", *args.argv],
                                  env=env).returncode
    try:
        row = step_collectives.step_collectives(
            args.model, args.method, args.mesh, rank=args.rank, batch=args.batch_size,
            seq=args.seq, grad_accum=args.grad_accum, remat=args.remat,
        )
    except (sharding.MeshError, ValueError) as err:
        raise BenchError(str(err).splitlines()[0]) from None
    row |= environment()
    write_json(args.json, [row])
    print(step_collectives.format_report(row), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad flags, with a one-line message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except BenchError as err:
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "METHOD_NAMES",
    "BenchError",
    "Case",
    "Settings",
    "build_parser",
    "cases",
    "hlo_row",
    "linear_case",
    "linear_flops",
    "main",
    "model_case",
    "model_flops",
    "peak_flops",
    "speed_row",
]

