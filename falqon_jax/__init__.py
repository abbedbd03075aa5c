"""FALQON in JAX: LoRA adapters melded into an FP8 backbone, one FP8 GEMM per layer.

Importing the package is cheap; :func:`load_model` pulls in the model code on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from falqon_jax.model.llama import LlamaModel

__all__ = ["load_model"]


def load_model(path_or_card: str | os.PathLike[str], **kwargs: Any) -> LlamaModel:
    """Load a LLaMA: a checkpoint directory, a Hugging Face Hub name (``org/name[@revision]``)
    or a model card; see :func:`falqon_jax.model.loading.load_model`."""
    from falqon_jax.model.loading import load_model as _load_model

    return _load_model(path_or_card, **kwargs)
