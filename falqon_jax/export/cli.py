"""``python -m falqon_jax.export``: the command line (see :mod:`falqon_jax.export`)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from falqon_jax.cli import OneLineParser, one_line_errors
from falqon_jax.export.layout import DTYPES, FORMATS, TOKENIZER_FILES, ExportError
from falqon_jax.export.writer import check_out, export_model
from falqon_jax.model.loading import LoadError

# --------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = OneLineParser(
        prog="python -m falqon_jax.export",
        description="Export a training run, run checkpoint, Hugging Face checkpoint (a "
        "directory or a Hub name) or FP8 export as a Hugging Face checkpoint (effective "
        "weights) or as FP8 weights with per-tensor scales (compressed-tensors layout).",
    )
    p.add_argument("--checkpoint", required=True,
                   help="run directory, OUT/checkpoints/STEP, FP8 export, Hugging Face "
                   "directory or Hub name (org/name[@revision]), or a model card's weights")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--format", default="hf", choices=FORMATS, help="hf (default) or fp8")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                   help="dtype of every non-FP8 tensor (default bfloat16)")
    p.add_argument("--tokenizer", help="copy tokenizer files from this directory or Hub "
                   "model (default: the source's, when known)")
    p.add_argument("--method", default="full",
                   help="linear method for converting a Hugging Face directory (default full)")
    p.add_argument("--rank", type=int, default=64, help="adapter rank for --method (default 64)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha for --method (default 16)")
    p.add_argument("--no-falqon-a", dest="falqon_a", action="store_false",
                   help="fp8: leave FALQON's A rows out of falqon_extras.safetensors "
                   "(only needed to rebuild the FALQON model exactly with load_fp8_export; "
                   "the PEFT adapter written for a non-zero b holds them anyway)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for a mistake, 74 for a run's
    checkpoint or ``OUT/frozen`` that cannot be read or differs from its fingerprint)."""
    from falqon_jax.train.checkpoints import CheckpointError
    from falqon_jax.train.outcome import EXIT_CHECKPOINT

    args = build_parser().parse_args(argv)
    return one_line_errors(lambda: _run(args), [((ExportError, LoadError), 2),
                                                (CheckpointError, EXIT_CHECKPOINT)])


_KIND_NAMES = {"run": "training run", "checkpoint": "run checkpoint",
               "hf": "Hugging Face checkpoint", "hub": "Hugging Face Hub model",
               "fp8": "FP8 export"}


def _tokenizer_dir(name: str | None) -> Path | None:
    """``--tokenizer``: a directory with tokenizer files, or a Hub name (its files fetched)."""
    if name is None:
        return None
    from falqon_jax.model.resolve import tokenizer_directory

    try:
        directory = tokenizer_directory(name)
    except ValueError as err:
        raise ExportError(f"--tokenizer {name}: {str(err).splitlines()[0]}") from None
    if directory is None or not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise ExportError(f"--tokenizer {name} holds no tokenizer files")
    return directory


def _run(args: argparse.Namespace) -> int:
    from falqon_jax.sources import kind_of, load_any

    out = Path(args.out)
    check_out(out)
    if args.rank <= 0:
        raise ExportError(f"--rank must be positive, got {args.rank}")
    if kind_of(args.checkpoint) == "card":
        from falqon_jax.model.config import available_cards, card_source

        if args.checkpoint not in available_cards() or card_source(args.checkpoint) is None:
            raise ExportError(f"--checkpoint {args.checkpoint} does not exist (neither a "
                              "directory, a Hugging Face Hub name nor a model card with weights)")
    tokenizer_override = _tokenizer_dir(args.tokenizer)
    kind = kind_of(args.checkpoint)
    # Runs restore in their own dtype (their dense weights are stored in it). Other sources
    # load in float32 when it matters: float32 exports and FP8 quantization.
    dtype = "float32" if args.dtype == "float32" or args.format == "fp8" else "bfloat16"
    if kind in ("run", "checkpoint"):
        dtype = None
    with _quiet_conversion_warnings():
        loaded = load_any(args.checkpoint, method=args.method, rank=args.rank,
                          alpha=args.alpha, dtype=dtype)
    tokenizer = tokenizer_override or loaded.tokenizer_dir
    export_model(loaded.model, out, format=args.format, dtype=args.dtype,
                 tokenizer_dir=tokenizer, falqon_a=args.falqon_a)
    note = "" if tokenizer else " (no tokenizer files: pass --tokenizer DIR to add them)"
    what = _KIND_NAMES.get(loaded.kind, loaded.kind)
    print(f"exported {what} {args.checkpoint} to {out} ({args.format}, {args.dtype}){note}")
    return 0


@contextlib.contextmanager
def _quiet_conversion_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


