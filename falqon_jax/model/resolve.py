"""Where a model's files are: ``--model`` (or ``load_model``'s first argument) as a local
directory, a Hugging Face Hub name or a model card.

* A local path wins: a directory is read as it is, nothing is downloaded.
* ``org/name`` or ``org/name@revision``: a Hub repository (:func:`fetch_model`).
* A name without a slash: a model card (``models/NAME.toml``); its weights are the card's
  ``source`` on the Hub (``llama-7b`` -> ``huggyllama/llama-7b``). With ``init="random"`` a
  card is only an architecture and nothing is downloaded.

:func:`fetch_model` downloads only what loading uses: ``config.json``,
``generation_config.json``, the tokenizer files, and the safetensors weights
(``model.safetensors``, or the shards ``model.safetensors.index.json`` names); never the
``*.bin``/``*.pth`` copies many repositories also carry. It checks the config describes a
LLaMA-family model with unquantized weights before fetching any weights. Files go to the
standard Hugging Face cache with progress bars, see :mod:`falqon_jax.hub`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from falqon_jax import hub
from falqon_jax.hub import HubError, HubName

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
INDEX = "model.safetensors.index.json"


def tokenizer_missing(directory: str | Path) -> str | None:
    """Why ``directory`` holds no tokenizer a user meant to give (the words after the
    name in a one-line error), or ``None`` when it has one of the files that make one."""
    if any((Path(directory) / name).is_file() for name in TOKENIZER_FILES[:3]):
        return None
    return "holds no tokenizer (tokenizer.json, tokenizer.model or tokenizer_config.json)"


def classify(name: str | os.PathLike[str]) -> str:
    """What ``name`` names: ``"dir"`` or ``"file"`` (an existing local path), ``"hub"``
    (``org/name[@revision]``, not a local path), ``"card"`` (no slash: a model-card name)
    or ``"missing"`` (a path that does not exist, e.g. ``./x`` or ``a/b/c``)."""
    path = Path(name)
    if path.exists():
        return "dir" if path.is_dir() else "file"
    if hub.parse_name(name) is not None:
        return "hub"
    text = str(name)
    return "missing" if "/" in text or os.sep in text or text.startswith((".", "~")) else "card"


def hub_source(name: str | os.PathLike[str]) -> HubName | None:
    """The Hub repository holding ``name``'s weights: ``name`` itself when it is a Hub name,
    a card's ``source``, else ``None`` (a local path, or a card without a source).

    Raises ``ValueError`` for an unknown card name.
    """
    from falqon_jax.model.config import card_source

    kind = classify(name)
    if kind == "hub":
        return hub.parse_name(name)
    if kind == "card":
        source = card_source(str(name))
        if source is None:
            return None
        parsed = hub.parse_name(source)
        if parsed is None:
            raise ValueError(f"model card {name!r} names source {source!r}, which is not a "
                             "Hugging Face Hub name (org/name)")
        return parsed
    return None


def fetch_model(name: HubName, *, weights: bool = True) -> Path:
    """The directory (a snapshot in the Hugging Face cache) holding Hub model ``name``'s
    config, tokenizer files and, with ``weights``, its safetensors weights; downloads what
    the cache lacks.

    Raises :class:`~falqon_jax.hub.HubError` (a ``ValueError``) with one line: no such
    repository, gated without access, offline and not cached, not a LLaMA-family
    checkpoint, quantized, or no safetensors weights.
    """
    snapshot = hub.open_snapshot(name, "model", first=("config.json", INDEX))
    listing = set(snapshot.files)
    if "config.json" not in listing:
        if not snapshot.listed:  # offline: the cache lacks it, whatever the repository has
            hub.download(snapshot, ["config.json"])
        raise HubError(f"{name} has no config.json: it is not a transformers checkpoint")
    _check_config(name, snapshot.directory)
    files = [f for f in (*CONFIG_FILES, *TOKENIZER_FILES) if f in listing]
    if weights:
        files += _weight_files(name, snapshot)
    return hub.download(snapshot, files)


def fetch_tokenizer(name: HubName) -> Path:
    """The snapshot directory holding Hub model ``name``'s tokenizer files (and config);
    downloads what the cache lacks. Raises :class:`~falqon_jax.hub.HubError`."""
    snapshot = hub.open_snapshot(name, "model", first=("tokenizer_config.json",))
    files = [f for f in (*CONFIG_FILES, *TOKENIZER_FILES) if f in snapshot.files]
    if not any(f in files for f in TOKENIZER_FILES[:3]):
        raise HubError(f"{name} has no tokenizer files (tokenizer.json, tokenizer.model or "
                       "tokenizer_config.json)")
    return hub.download(snapshot, files)


def model_directory(name: str | os.PathLike[str], *, weights: bool = True) -> Path:
    """The local directory of model ``name``: a local directory as it is, a Hub name or a
    card's source fetched (:func:`fetch_model`).

    Raises ``ValueError`` with one line for a file, a missing path, an unknown card, a card
    without a source, or any :class:`~falqon_jax.hub.HubError`.
    """
    kind = classify(name)
    if kind == "dir":
        return Path(name)
    if kind == "file":
        raise ValueError(f"{name} is a file, not a checkpoint directory")
    if kind == "missing":
        raise ValueError(f"{name} does not exist")
    source = hub_source(name)
    if source is None:
        raise ValueError(f"model card {str(name)!r} has no weights (no source): pass a "
                         'checkpoint directory or Hub name instead, or init="random" '
                         "(--init random) for random weights")
    with _naming_the_card(name, kind, source):
        return fetch_model(source, weights=weights)


def tokenizer_directory(name: str | os.PathLike[str]) -> Path | None:
    """Where the tokenizer of ``name`` (a ``--tokenizer`` or ``--model`` value) is: a local
    directory as it is, a Hub name's or card source's tokenizer files fetched; ``None`` for a
    card without a source. Raises ``ValueError`` like :func:`model_directory`."""
    kind = classify(name)
    if kind == "dir":
        return Path(name)
    if kind in ("file", "missing"):
        raise ValueError(f"tokenizer {name} is not a directory")
    source = hub_source(name)
    if source is None:
        return None
    with _naming_the_card(name, kind, source):
        return fetch_tokenizer(source)


@contextlib.contextmanager
def _naming_the_card(name: str | os.PathLike[str], kind: str, source: HubName
                     ) -> Iterator[None]:
    """Errors about a card's source say which card named it."""
    try:
        yield
    except HubError as err:
        if kind != "card":
            raise
        raise HubError(f"model card {str(name)!r} names its weights {source}: {err}") from None


def _check_config(name: HubName, directory: Path) -> None:
    """Refuse, before any weights are fetched, a config that is not a plain LLaMA or declares
    quantized weights."""
    from falqon_jax.model.config import LlamaConfig

    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise HubError(f"{name}: config.json is unreadable ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "llama":
        raise HubError(f"{name} is a {model_type!r} model, not a LLaMA-family checkpoint "
                       "(model_type 'llama'); falqon-jax fine-tunes LLaMA models")
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise HubError(f"{name} holds quantized weights ({method}); pass the unquantized "
                       "checkpoint it was made from")
    try:
        LlamaConfig.from_hf(directory)
    except ValueError as err:
        raise HubError(f"{name}: {str(err).splitlines()[0].replace(str(directory), 'the model')}"
                       ) from None


def _weight_files(name: HubName, snapshot: hub.Snapshot) -> list[str]:
    """The safetensors files loading reads: the index and the shards it names, else
    ``model.safetensors``, else the top-level ``*.safetensors``."""
    listing = set(snapshot.files)
    if INDEX in listing:
        try:
            weight_map = json.loads((snapshot.directory / INDEX).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise HubError(f"{name}: {INDEX} is unreadable") from None
        absent = [s for s in shards if s not in listing]
        if absent and snapshot.listed:
            raise HubError(f"{name}: {INDEX} names {absent[0]}, which the repository lacks")
        return [INDEX, *shards]
    if "model.safetensors" in listing:
        return ["model.safetensors"]
    top = sorted(f for f in listing if f.endswith(".safetensors") and "/" not in f)
    if top:
        return top
    others = sorted({Path(f).suffix for f in listing if f.endswith((".bin", ".pth", ".pt",
                                                                      ".gguf", ".h5"))})
    held = f" (it holds {', '.join(others)} files)" if others else ""
    raise HubError(f"{name} has no *.safetensors weights{held}; only safetensors checkpoints "
                   "are supported: convert it with transformers' save_pretrained")
