"""``python -m falqon_jax.bench SUBCOMMAND``: the command line (see :mod:`falqon_jax.bench`)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from falqon_jax.bench.cases import (
    DEFAULT_METHODS,
    METHOD_NAMES,
    BenchError,
    Settings,
    cases,
    check_settings,
    model_config,
    parse_methods,
    parse_shapes,
    resolve,
)
from falqon_jax.bench.hlo import HLO_HEADER, format_hlo, hlo_row
from falqon_jax.bench.speed import CPU_NOTE, SPEED_HEADER, environment, format_speed, speed_row
from falqon_jax.cli import OneLineParser
from falqon_jax.train.config import METHODS as TRAIN_METHODS

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


def run_gpu(args: argparse.Namespace) -> int:
    """The ``gpu`` subcommand: see :mod:`falqon_jax.bench.gpu`."""
    from falqon_jax import targets
    from falqon_jax.bench import gpu

    try:
        target = targets.get(args.target)
        targets.use_compile_only()
    except targets.TargetError as err:
        raise BenchError(str(err)) from None
    backends = tuple(dict.fromkeys(b.strip() for b in args.backends.split(",") if b.strip()))
    unknown = [b for b in backends if b not in targets.GEMM_BACKENDS]
    if unknown or not backends:
        raise BenchError(f"--backends must name {' and/or '.join(targets.GEMM_BACKENDS)}, "
                         f"got {args.backends!r}")
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) \
        if args.models.strip().lower() != "none" else ()
    settings = Settings(
        methods=parse_methods(args.methods), shapes=parse_shapes(args.shapes),
        tokens=args.tokens, rank=args.rank, model_card=None, model_layers=0,
        batch=args.batch, seq=args.seq, top_k=args.top_k, remat=args.remat, seed=0)
    check_settings(settings)
    for card in models:
        model_config(dataclasses.replace(settings, model_card=card))  # an unknown card
    if args.fsdp < 0 or args.fsdp == 1:
        raise BenchError(f"--fsdp must be 0 (off) or at least 2 devices, got {args.fsdp}")
    if args.fsdp and args.batch % args.fsdp:
        raise BenchError(f"--batch {args.batch} must divide over --fsdp {args.fsdp} devices")
    env = environment()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"falqon_jax.bench gpu: {stamp}; jax {env['jax_version']}; compiled for "
          f"{target.device} (compile only, no GPU used) on host CPU {env['host_cpu']}",
          flush=True)
    print(f"models {', '.join(models) or 'none'}: every layer, batch {args.batch} x seq "
          f"{args.seq}, rank {args.rank}, bf16, remat {'on' if args.remat else 'off'}; linear "
          f"shapes {args.shapes} with {args.tokens} tokens; back ends {', '.join(backends)}",
          flush=True)
    print("peak/args/temp: GiB per device (memory_analysis); FP8/bf16/f32 TF: GEMM TFLOP per "
          "step; min FP8: the method's minimum; wid: GEMMs reading widened FP8; FLOP ms / "
          f"byte ms / bound ms: LOWER BOUNDS on {target.device} (dense peaks "
          f"{target.fp8_tflops or '-'} FP8 / {target.bf16_tflops} bf16 TFLOP/s, "
          f"{target.hbm_bytes_per_s / 1e12:.2f} TB/s), not measurements", flush=True)
    print(gpu.HEADER, flush=True)
    rows: list[dict[str, Any]] = []

    def on_row(row: dict[str, Any]) -> None:
        rows.append(row)
        write_json(args.json, rows)
        print(gpu.format_row(row), flush=True)

    gpu.run(settings, target, backends, models, args.fsdp, env, on_row)
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} program(s) did not compile", file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------
# Command line.


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


_METHODS_HELP = (f"comma-separated methods (default {','.join(DEFAULT_METHODS)}; also "
                 f"{','.join(m for m in METHOD_NAMES if m not in DEFAULT_METHODS)})")


def _add_common(parser: argparse.ArgumentParser) -> None:
    """The flags ``hlo`` and ``speed`` share: methods, linear shapes, the model rows."""
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=_METHODS_HELP)
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
    _add_json(parser.add_argument)


def _add_json(add: Callable[..., argparse.Action],
              help: str = "write the rows as a JSON list to FILE") -> None:
    """``--json FILE``, every subcommand's: where its rows go (``None``: nowhere)."""
    add("--json", type=Path, default=None, metavar="FILE", help=help)


def _add_remat(add: Callable[..., argparse.Action], when: str) -> None:
    """``--remat/--no-remat`` of the subcommands that compile whole models: gradient
    checkpointing, on unless ``--no-remat``; ``when`` ends its help."""
    add("--remat", action=argparse.BooleanOptionalAction, default=True,
        help=f"gradient checkpointing {when}")


# Each subcommand's line in the main --help page and the description atop its own.
_ABOUT: dict[str, tuple[str, str]] = {
    "hlo": ("compile-only: FP8 casts, GEMMs, memory and cost analysis per method",
            "Lower and compile one train step per method from abstract shapes "
            "(nothing is executed) and count FP8 casts, GEMMs, memory and FLOPs."),
    "speed": ("wall-clock per train step, tokens/s and MFU per method",
              "Time one train step per method on the default device (median after "
              "warm-up). On a CPU the numbers are not indicative of FP8 speed."),
    "gpu": ("compile every train step for a GPU without one: memory, FP8 GEMMs, "
            "copies, roofline bounds",
            "Compile the train step of every method for a compile-only GPU (default an H100 "
            "SXM; needs the h100 extra, no GPU) on both GEMM back ends, for linear layers and "
            "whole models at the paper's settings, and report peak memory, GEMMs by "
            "precision, widened FP8 operands, FP8 copies and roofline lower bounds "
            "(see falqon_jax.bench.gpu)."),
    "accuracy": ("held-out loss per method after fine-tuning a pretrained model",
                 "Fine-tune a pretrained LLaMA (default: SmolLM2-135M-Instruct from ../shared, "
                 "converted into ~/.cache/falqon-jax) with every method and seed (same steps, "
                 "rank, lr, batches, held-out split) and with FALQON's other update rules; "
                 "report the held-out loss, the fraction of LoRA's improvement each recovers "
                 "and wall time. See falqon_jax.bench.accuracy."),
    "collectives": ("collectives per layer of the sharded train step (compile only)",
                    "Compile the train step of a model card over a device mesh (simulated on "
                    "a CPU; abstract weights) and count its collectives per decoder layer, as "
                    "the SPMD partitioner emits them and as the backend compiles them."),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m falqon_jax.bench`` argument parser (one subparser per subcommand)."""
    parser = OneLineParser(
        prog="python -m falqon_jax.bench",
        description="Benchmarks of one training step per method (falqon, lora, fp8_lora, "
        "qlora, full).",
    )
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{hlo,speed,gpu,accuracy,collectives}")
    for name, run, add_flags in (("hlo", run_hlo, _add_hlo), ("speed", run_speed, _add_speed),
                                 ("gpu", run_gpu, _add_gpu),
                                 ("accuracy", run_accuracy, _add_accuracy),
                                 ("collectives", run_collectives, _add_collectives)):
        help, description = _ABOUT[name]
        command = sub.add_parser(name, help=help, description=description)
        command.set_defaults(run=run)
        add_flags(command)
    return parser


def _add_hlo(parser: argparse.ArgumentParser) -> None:
    """The ``hlo`` subcommand's flags: the preset's (:func:`_add_common`) and its own."""
    _add_common(parser)
    parser.add_argument(
        "--large-elements", type=_int, default=None,
        help="casts of tensors with at least this many elements count as large "
        "(default 2 * tokens * max(rank, 16))",
    )
    parser.add_argument(
        "--dump-hlo", type=Path, default=None, metavar="DIR",
        help="write each case's lowered StableHLO and optimized HLO text into DIR",
    )


def _add_speed(parser: argparse.ArgumentParser) -> None:
    """The ``speed`` subcommand's flags: the preset's (:func:`_add_common`) and its own."""
    _add_common(parser)
    parser.add_argument("--repeats", type=_int, default=5,
                        help="timed steps; the median is reported (default 5)")
    parser.add_argument("--warmup", type=_int, default=2,
                        help="untimed steps first, including compilation (default 2)")


def _add_gpu(parser: argparse.ArgumentParser) -> None:
    """The ``gpu`` subcommand's flags."""
    add = parser.add_argument
    add("--target", default="h100", help="GPU to compile for: h100 (default), h200, a100, l4")
    add("--backends", default="cublaslt,triton",
        help="GEMM back ends, comma-separated: cublaslt, triton (default both)")
    add("--methods", default=",".join(DEFAULT_METHODS), help=_METHODS_HELP)
    add("--models", default="llama-7b,llama-13b",
        help="model cards compiled whole (every layer), or 'none' (default llama-7b,llama-13b)")
    add("--shapes", default="4096x4096,11008x4096",
        help="linear weight shapes OUTxIN, or 'none' (default 4096x4096,11008x4096)")
    add("--tokens", type=_int, default=8192, help="tokens per linear-layer step (default 8192)")
    add("--rank", type=_int, default=64, help="adapter rank (default 64, the paper's)")
    add("--batch", type=_int, default=16, help="model batch (default 16, the paper's)")
    add("--seq", type=_int, default=512, help="model sequence length (default 512)")
    add("--top-k", type=_int, default=10, help="FALQON's top-k (merging rules; default 10)")
    _add_remat(add, "in the models (default on, the paper's)")
    add("--fsdp", type=_int, default=8,
        help="also compile the models' FSDP step over N GPUs of one node (default 8; 0: off)")
    _add_json(add)


def _add_accuracy(parser: argparse.ArgumentParser) -> None:
    """The ``accuracy`` subcommand's flags."""
    add = parser.add_argument
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
    _add_json(add, "write the rows as a JSON list (rewritten after every method)")
    add("--plot", type=Path, default=None, metavar="PNG",
        help="write a bar chart of held-out loss per method (needs matplotlib)")


def _add_collectives(parser: argparse.ArgumentParser) -> None:
    """The ``collectives`` subcommand's flags."""
    add = parser.add_argument
    add("--model", default="tiny", help="model card (default tiny)")
    add("--method", default="falqon", choices=TRAIN_METHODS,
        help="method (default falqon, its default rule)")
    add("--mesh", default="fsdp=8", help="data=D,fsdp=F (default fsdp=8)")
    add("--rank", type=_int, default=16, help="adapter rank (default 16)")
    add("--batch-size", type=_int, default=16, help="rows per step (default 16)")
    add("--seq", type=_int, default=64, help="tokens per row (default 64)")
    add("--grad-accum", type=_int, default=1, help="micro-batches per step (default 1)")
    _add_remat(add, "as in training (default on)")
    _add_json(add, "write the row as JSON")


def _seed_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        seeds = tuple(dict.fromkeys(int(t) for t in text.split(",") if t.strip()))
    except ValueError:
        raise BenchError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise BenchError(f"{flag} must name at least one non-negative seed, got {text!r}")
    return seeds


def run_accuracy(args: argparse.Namespace) -> int:
    """The ``accuracy`` subcommand: see :mod:`falqon_jax.bench.accuracy`."""
    from falqon_jax.bench import accuracy

    quick = {"seeds": (0,), "ablation_seeds": (0,),
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
    for name in ("ablations", "top_k"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    train = ({"steps": 2} if args.quick else {}) | {
        name: getattr(args, name) for name in accuracy.TRAIN_FLAGS
        if getattr(args, name) is not None}
    settings = accuracy.StudySettings(**values,
                                      train=dataclasses.replace(accuracy.STUDY, **train))
    for name in ("steps", "rank", "top_k", "batch_size", "source_len", "target_len",
                 "eval_size"):
        value = settings.top_k if name == "top_k" else getattr(settings.train, name)
        if value <= 0:
            raise BenchError(f"--{name.replace('_', '-')} must be a positive integer, "
                             f"got {value}")
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
    from falqon_jax import sharding
    from falqon_jax.bench import collectives

    try:
        devices = math.prod(sharding.mesh_sizes(args.mesh, 1 << 20).values())
    except sharding.MeshError as err:
        raise BenchError(str(err)) from None
    for flag in ("rank", "batch_size", "seq", "grad_accum"):
        if getattr(args, flag) <= 0:
            raise BenchError(f"--{flag.replace('_', '-')} must be positive")
    if os.environ.get(collectives.DUMP_ENV) is None:  # the same flags, in the child
        with tempfile.TemporaryDirectory() as dump:
            env = collectives.child_environment(devices, Path(dump))
            return subprocess.run([sys.executable, "-m", "falqon_jax.bench", *args.argv],
                                  env=env).returncode
    try:
        row = collectives.step_collectives(
            args.model, args.method, args.mesh, rank=args.rank, batch=args.batch_size,
            seq=args.seq, grad_accum=args.grad_accum, remat=args.remat,
        )
    except (sharding.MeshError, ValueError) as err:
        raise BenchError(str(err).splitlines()[0]) from None
    row |= environment()
    write_json(args.json, [row])
    print(collectives.format_report(row), flush=True)
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

