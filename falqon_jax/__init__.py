"""FALQON in JAX: LoRA adapters melded into an FP8 backbone, one FP8 GEMM per layer.

Importing the package is cheap; :func:`load_model` pulls in the model code and
:func:`restore` the checkpoint code on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from falqon_jax.model.llama import LlamaModel
    from falqon_jax.train.runs import RestoredRun

__all__ = ["load_model", "restore"]


def load_model(path_or_card: str | os.PathLike[str], **kwargs: Any) -> LlamaModel:
    """Load a LLaMA: a checkpoint directory, a Hugging Face Hub name (``org/name[@revision]``)
    or a model card; see :func:`falqon_jax.model.loading.load_model`."""
    from falqon_jax.model.loading import load_model as _load_model

    return _load_model(path_or_card, **kwargs)


def restore(path: str | os.PathLike[str], step: int | None = None) -> RestoredRun:
    """A training run's trained params as plain nested dicts of arrays, with its settings and
    step, both checkpoint parts proven against their fingerprints; see
    :func:`falqon_jax.train.runs.restore` for the layout, shapes and dtypes."""
    from falqon_jax.train.runs import restore as _restore

    return _restore(path, step)
