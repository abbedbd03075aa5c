"""The model: LLaMA in Flax with a pluggable linear layer per method.

* :mod:`~falqon_jax.model.config` -- architectures (:class:`LlamaConfig`), model cards in
  ``models/``, Hugging Face ``config.json``;
* :mod:`~falqon_jax.model.methods` -- the registry of linear methods (``full``, ``frozen``,
  ``falqon`` and its variants, the baselines of :mod:`falqon_jax.baselines`);
* :mod:`~falqon_jax.model.llama` -- the decoder (``nn.scan`` over layers), plans of which
  layer uses which method, :class:`LlamaModel`;
* :mod:`~falqon_jax.model.loading` -- Hugging Face safetensors checkpoints into a model
  (``falqon_jax.load_model``);
* :mod:`~falqon_jax.model.generation` -- greedy/sampled generation with a KV cache.
"""
