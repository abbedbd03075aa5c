"""``python -m falqon_jax.demo``: fine-tune a toy MLP with FALQON: the loss falls on the CPU.

Compares FALQON with float32 LoRA on the same data, steps and optimizer (see
:mod:`falqon_jax.bench.toy` for what each method is).
"""

from __future__ import annotations

import argparse
import sys
import time

from falqon_jax.bench import toy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falqon_jax.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--rank", type=int, default=32, help="adapter rank (default 32)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--top-k", type=int, default=10,
                        help="rows merged per step by the paper's rule")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rank < 1 or args.top_k < 1 or args.lr <= 0:
        parser.error("--steps, --rank and --top-k must be >= 1 and --lr > 0")
    if args.rank > 64:
        parser.error("--rank must be <= 64 (the toy MLP's smallest layer width)")

    problem = toy.make_problem()
    every = max(1, args.steps // 10)

    def report(step: int, loss: float) -> None:
        if step % every == 0 or step == args.steps - 1:
            print(f"  step {step + 1:4d}/{args.steps}  train loss {loss:.4f}", flush=True)

    print("FALQON fine-tuning a toy 2-layer MLP (FP8 backbone, melded LoRA, live b)")
    results = {}
    runs = [("falqon", "visible"), ("falqon", "paper")] + [(m, None) for m in toy.METHODS[1:]]
    for method, rule in runs:
        start = time.perf_counter()
        hook = report if rule == "visible" else None
        name = f"{method} ({rule})" if rule else method
        results[name] = toy.train(method, problem, rank=args.rank, lr=args.lr,
                                  steps=args.steps, top_k=args.top_k, on_step=hook,
                                  **({"rule": rule} if rule else {}))
        results[name]["seconds"] = time.perf_counter() - start
    print("\nheld-out MSE            before    after   (CPU seconds; FP8 is emulated on CPU)")
    for method, r in results.items():
        print(f"  {method:<22s} {r['initial_loss']:.4f} -> {r['final_loss']:.4f}  "
              f"({r['seconds']:.1f} s)")
    print("lora_frozen_a trains B on FALQON's frozen A in float32: the like-for-like reference;"
          "\nfalqon (paper) is the published proxy-buffer rule with top-k merges.")
    return 0


if __name__ == "__main__":
    from falqon_jax.cli import cpu_unless_gpu, quiet_output

    cpu_unless_gpu()
    quiet_output()
    sys.exit(main())
