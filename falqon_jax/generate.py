"""``python -m falqon_jax.generate``: continue a prompt with a trained or converted model.

``--model`` takes a training run (``OUT``: its latest checkpoint), one checkpoint
(``OUT/checkpoints/STEP``), an FP8 export, a Hugging Face LLaMA checkpoint -- a directory or
a Hub name, ``org/name[@revision]``, downloaded into the Hugging Face cache -- (converted
with ``--method``/``--rank``, default ``full``) or a model card (its Hub ``source``'s
weights, or random weights with ``--init random``).

The prompt is ``--prompt TEXT`` (tokenized with the model's tokenizer, or ``--tokenizer
DIR|NAME``; a BOS in front where the tokenizer adds one), with ``--chat`` wrapped as a user
turn in the tokenizer's chat template (``--system`` adds a system turn), or ``--prompt-ids
1,2,3`` (token ids as given, for models without a tokenizer). The continuation goes to
stdout: text, or comma-separated ids with
``--prompt-ids``. ``--temperature 0`` (the default) is greedy decoding; otherwise
temperature + top-p (nucleus) sampling, reproducible with ``--seed``. Generation stops at
the end-of-sequence token unless ``--ignore-eos``.

Mistakes end with one line on stderr and exit code 2; a run's checkpoint (or ``OUT/frozen``)
that cannot be read or differs from its fingerprint, with one line and exit code 74, as
``--resume`` checks it.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from falqon_jax.cli import OneLineParser, one_line_errors
from falqon_jax.model.loading import LoadError
from falqon_jax.sources import Loaded
from falqon_jax.train.data import leading_bos


class UsageError(ValueError):
    """A mistake in the command line; reported as one line."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = OneLineParser(
        prog="python -m falqon_jax.generate",
        description="Generate a continuation with a training run, run checkpoint, FP8 "
        "export, Hugging Face LLaMA checkpoint (a directory or a Hub name) or model card.",
    )
    add = p.add_argument
    add("--model", required=True,
        help="run directory, OUT/checkpoints/STEP, FP8 export, Hugging Face directory or Hub "
        "name (org/name[@revision]), or model card")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1")
    add("--tokenizer", help="tokenizer directory or Hub name (default: the model's, when known)")
    add("--chat", action="store_true",
        help="wrap --prompt as a user turn in the tokenizer's chat template (instruct models)")
    add("--system", help="with --chat: a system message before the prompt")
    add("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    add("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    add("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    add("--seed", type=int, default=0, help="sampling seed (default 0)")
    add("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    add("--dtype", choices=("bfloat16", "float32"),
        help="compute dtype (default: the run's, else bfloat16)")
    add("--method", default="full",
        help="linear method for converting a Hugging Face directory or card (default full)")
    add("--rank", type=int, default=64, help="adapter rank for --method (default 64)")
    add("--alpha", type=float, default=16.0, help="LoRA alpha for --method (default 16)")
    add("--init", choices=("random",), help="random weights (for a model card)")
    add("--mesh", default=None,
        help="shard the weights over devices, e.g. fsdp=8 or data=2,fsdp=4 (default: one "
        "device)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for a mistake, 74 for a damaged
    checkpoint)."""
    args = build_parser().parse_args(argv)
    from falqon_jax.sharding import MeshError
    from falqon_jax.train.checkpoints import CheckpointError
    from falqon_jax.train.outcome import EXIT_CHECKPOINT

    return one_line_errors(lambda: run(args), [((UsageError, LoadError, MeshError), 2),
                                               (CheckpointError, EXIT_CHECKPOINT)])


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise UsageError("--prompt-ids is empty")
    return ids


def _check_args(args: argparse.Namespace) -> list[int] | None:
    """Validate the flags that need no model; returns ``--prompt-ids`` parsed (or None)."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.rank <= 0:
        raise UsageError(f"--rank must be positive, got {args.rank}")
    if args.chat and args.prompt_ids is not None:
        raise UsageError("--chat wraps a text --prompt in the chat template; it does not take "
                         "--prompt-ids")
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    return None if args.prompt_ids is None else _parse_ids(args.prompt_ids)


def load_tokenizer(loaded: Loaded, override: str | None) -> Any:
    """The tokenizer for ``loaded``: ``override`` (a directory or Hub name), the demo's
    character tokenizer, or the Hugging Face tokenizer next to the weights; ``UsageError`` if
    there is none."""
    if override is None and loaded.demo:
        from falqon_jax.train.demo_data import CharTokenizer

        return CharTokenizer()
    source = loaded.tokenizer_dir
    if override is not None:
        from falqon_jax.model.resolve import tokenizer_directory

        try:
            source = tokenizer_directory(override)
        except ValueError as err:
            raise UsageError(f"--tokenizer {override}: {str(err).splitlines()[0]}") from None
    if source is None:
        raise UsageError(
            "this model has no known tokenizer: pass --tokenizer DIR, or --prompt-ids"
        )
    from falqon_jax.model.resolve import tokenizer_missing

    missing = tokenizer_missing(source)
    if missing:
        raise UsageError(f"--tokenizer {override} {missing}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load a tokenizer from {override or source}: {first}") from None


def _encode(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "convert_ids_to_tokens"):  # a Hugging Face tokenizer
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(text)
    bos = leading_bos(tokenizer)  # only where the tokenizer itself adds one
    return ([bos] if bos is not None else []) + list(ids)


def encode_chat(tokenizer: Any, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of ``prompt`` as one user turn (after an optional ``system`` turn) in the
    tokenizer's chat template, ending with the template's generation prompt (the assistant
    header), as training renders chat records: the template's text tokenized without any
    special tokens added, so the ids are ``apply_chat_template(..., tokenize=True)``'s.

    Raises :class:`UsageError` when the tokenizer has no chat template.
    """
    from falqon_jax.train.data import has_chat_template

    if not has_chat_template(tokenizer):
        raise UsageError("--chat: the tokenizer has no chat template; pass --tokenizer with one "
                         "(a chat_template in tokenizer_config.json or chat_template.jinja), "
                         "or drop --chat")
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return tokenizer.decode(ids, skip_special_tokens=True)
    return tokenizer.decode(ids)


def run(args: argparse.Namespace) -> int:
    """Load, generate, print. Raises :class:`UsageError`/:class:`LoadError` on mistakes."""
    ids = _check_args(args)
    from falqon_jax.sharding import optional_mesh
    from falqon_jax.sources import kind_of, load_any

    mesh = optional_mesh(args.mesh)

    if kind_of(args.model) == "card":
        from falqon_jax.model.config import available_cards, card_source

        if args.model not in available_cards():
            raise UsageError(f"--model {args.model}: no such directory, model card or Hugging "
                             "Face Hub name (org/name)")
        if args.init is None and card_source(args.model) is None:
            raise UsageError(
                f"--model {args.model} is a model card without weights (it names no Hub "
                "source): pass --init random for random weights"
            )
    with warnings.catch_warnings():  # unconverted-layer notices are not news here
        warnings.simplefilter("ignore", UserWarning)
        loaded = load_any(args.model, method=args.method, rank=args.rank, alpha=args.alpha,
                          dtype=args.dtype, seed=args.seed, init=args.init, mesh=mesh)
    model = loaded.model
    tokenizer = None
    if ids is None:
        tokenizer = load_tokenizer(loaded, args.tokenizer)
        ids = encode_chat(tokenizer, args.prompt, args.system) if args.chat \
            else _encode(tokenizer, args.prompt)
        if not ids:
            raise UsageError("--prompt encodes to no tokens")
    vocab = model.config.vocab_size
    if max(ids) >= vocab or min(ids) < 0:
        raise UsageError(f"prompt token ids must be in 0..{vocab - 1}")
    eos: Any = None
    if not args.ignore_eos:
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        eos = eos if eos is not None else model.config.eos_token_id
    from falqon_jax.model.generation import generate

    out = generate(model.module, model.params, [ids], args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                   eos_id=eos, mesh=mesh)[0]
    if tokenizer is None:
        print(",".join(str(t) for t in out))
    else:
        print(_decode(tokenizer, out))
    return 0


if __name__ == "__main__":
    from falqon_jax.cli import cpu_unless_gpu, quiet_output

    cpu_unless_gpu()
    quiet_output()
    sys.exit(main())
