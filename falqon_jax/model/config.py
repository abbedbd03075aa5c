"""LLaMA architecture description: :class:`LlamaConfig`, read from Hugging Face or a model card.

Model cards are TOML files in the repository's top-level ``models/`` folder, shipped inside
the package as ``falqon_jax/cards`` (:mod:`falqon_jax.packaged`), or in the folder named by
the ``FALQON_MODELS_DIR`` environment variable. A card holds the
:class:`LlamaConfig` fields at top level, an optional ``[rope_scaling]`` table, a
``description`` and, for a published model, ``source``: the Hugging Face Hub name of its
weights (:func:`card_source`), which ``--model CARD`` fine-tunes.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from falqon_jax import packaged

MODELS_DIR_ENV = "FALQON_MODELS_DIR"
_CARD_INFO_KEYS = ("description", "source")
_ROPE_TYPES = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_type`` ``"linear"`` or ``"llama3"``).

    ``linear`` divides every position by ``factor``. ``llama3`` (Llama 3.1) divides the low
    frequencies by ``factor``, keeps the high ones and interpolates in between, with the
    band edges at ``original_max_position_embeddings / {low,high}_freq_factor``.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"unsupported rope scaling type {self.rope_type!r}; supported: {_ROPE_TYPES}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RopeScaling | None:
        """Build from a Hugging Face ``rope_scaling``/``rope_parameters`` dict.

        Returns ``None`` for the default (unscaled) RoPE. Accepts both ``rope_type`` and the
        older ``type`` key; ignores ``rope_theta`` and other unrelated keys.
        """
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type in (None, "default"):
            return None
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        return cls(rope_type=rope_type, **{k: v for k, v in d.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a LLaMA decoder (hashable, so it can be a static argument).

    ``rope_scaling`` accepts a :class:`RopeScaling` or a plain dict (converted on
    construction). ``eos_token_id`` may be one id or a tuple of ids.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, path: str | os.PathLike[str]) -> LlamaConfig:
        """Read a local Hugging Face LLaMA ``config.json`` through ``transformers.AutoConfig``.

        Handles both ``rope_parameters`` (transformers 5) and ``rope_scaling`` +
        ``rope_theta`` (older versions). Raises ``ValueError`` if ``path`` holds no config
        or a model that is not a plain LLaMA (other ``model_type``, biases, non-SiLU MLP).
        """
        from transformers import AutoConfig  # heavy import, only when needed

        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
        try:
            hf = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{path}: config.json is not a usable model config: {err}") from err
        if hf.model_type != "llama":
            raise ValueError(f"{path} holds a {hf.model_type!r} model, not a LLaMA ('llama')")
        if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
            raise ValueError(f"{path}: LLaMA variants with linear biases are not supported")
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: only the SiLU (SwiGLU) MLP is supported")
        rope_params = getattr(hf, "rope_parameters", None)
        if rope_params is not None:
            theta = rope_params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
            scaling = RopeScaling.from_dict(rope_params)
        else:
            theta = getattr(hf, "rope_theta", 10000.0)
            scaling = RopeScaling.from_dict(getattr(hf, "rope_scaling", None) or {})
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_id=getattr(hf, "eos_token_id", None),
        )


def models_dir() -> Path:
    """The model-card folder: ``$FALQON_MODELS_DIR``, else the cards shipped with the
    package (``models/`` in the repository)."""
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env)
    return packaged.cards_dir()


def available_cards() -> list[str]:
    """Names of the model cards found in :func:`models_dir` (sorted)."""
    return packaged.names(models_dir())


def _read_card(name: str) -> tuple[Path, dict[str, Any]]:
    path = models_dir() / f"{name}.toml"
    if not path.is_file():
        raise ValueError(
            f"unknown model card {name!r}; available: {', '.join(available_cards()) or 'none'} "
            f"(in {models_dir()}); or pass a local checkpoint directory or a Hugging Face Hub "
            "name (org/name)"
        )
    with path.open("rb") as f:
        return path, tomllib.load(f)


def load_card(name: str) -> LlamaConfig:
    """The :class:`LlamaConfig` of model card ``name`` (``models/NAME.toml``).

    Raises ``ValueError`` listing the available cards when ``name`` is unknown.
    """
    path, fields = _read_card(name)
    for key in _CARD_INFO_KEYS:
        fields.pop(key, None)
    try:
        return LlamaConfig(**fields)
    except TypeError as err:
        raise ValueError(f"model card {path} is malformed: {err}") from err


def card_source(name: str) -> str | None:
    """The Hugging Face Hub name of card ``name``'s weights (its ``source``, e.g.
    ``"huggyllama/llama-7b"``), or ``None`` for a card without one (``tiny``).

    Raises ``ValueError`` when ``name`` is unknown, like :func:`load_card`.
    """
    source = _read_card(name)[1].get("source")
    return str(source) if source else None
