"""The methods FALQON is compared with, as linear-layer implementations for
:mod:`falqon_jax.model.methods`:

* :mod:`~falqon_jax.baselines.adapter` -- the LoRA adapter they share (``A``, ``B``, their
  ``alpha / rank`` scaling and PEFT init);
* :mod:`~falqon_jax.baselines.lora` -- LoRA on a bf16/f32 backbone;
* :mod:`~falqon_jax.baselines.fp8_lora` -- LoRA on an FP8 backbone, every GEMM quantized on
  the fly (the torchao + PEFT baseline);
* :mod:`~falqon_jax.baselines.nf4` -- NF4 double quantization (QLoRA's storage format);
* :mod:`~falqon_jax.baselines.qlora` -- LoRA on the NF4 backbone.
"""
