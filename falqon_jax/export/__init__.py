"""``python -m falqon_jax.export``: write a model as a Hugging Face checkpoint or as FP8 weights.

Sources: a training run (``OUT``, its latest checkpoint), one checkpoint
(``OUT/checkpoints/STEP``), a Hugging Face LLaMA directory (converted with ``--method``)
or an FP8 export. ``--out`` must not exist or be an empty directory; the export is written
to a temporary sibling directory and renamed into place at the end, so a failed export
leaves nothing behind.

Format ``hf``: a plain LLaMA checkpoint any Hugging Face loader reads::

    config.json            transformers.LlamaConfig (``dtype``: the export dtype)
    model.safetensors      (or model-0000i-of-0000N.safetensors + index, 5 GiB shards)
    tokenizer files        copied from the source (or --tokenizer), when known

Tensors use the Hugging Face names (``model.embed_tokens.weight``,
``model.layers.N.self_attn.q_proj.weight`` ..., ``model.norm.weight``, ``lm_head.weight``)
in ``--dtype`` (bfloat16 by default, or float32). Linear weights are the *effective*
weights the model computes with, ``(out, in)``:

* ``full`` / ``frozen``: the weight itself;
* ``falqon``: ``DQ(w8[:out]) + b DQ(w8[out:])`` with ``DQ(w) = w * scale`` (float32
  ``DQ``, the sum in float64, rounded once; ``b`` is zero for the proxy update rules, which
  is checked, and updates still waiting in their proxy buffer are not part of the model);
* ``lora`` / ``qlora`` / ``fp8_lora``: ``W + (alpha / rank) B A`` with ``W`` dequantized
  from NF4 or FP8 first.

A model with its own ``lm_head`` is written untied (``tie_word_embeddings: false``).

Format ``fp8``: a compressed-tensors checkpoint (``quant_method: compressed-tensors``,
``format: float-quantized``), the layout vLLM and transformers read for FP8 models, with
static per-tensor FP8 weights and dynamic per-tensor FP8 activations::

    config.json
      quantization_config:
        quant_method: compressed-tensors, format: float-quantized,
        quantization_status: compressed, kv_cache_scheme: null,
        config_groups.group_0:
          targets: [Linear]
          weights:           {num_bits: 8, type: float, symmetric: true,
                              strategy: tensor, dynamic: false, observer: minmax}
          input_activations: {num_bits: 8, type: float, symmetric: true,
                              strategy: tensor, dynamic: true, observer: null}
        ignore: [every linear layer kept in --dtype, e.g. lm_head]
      falqon_jax: {format_version, methods, rank, alpha, fp8_targets, adapter}
                  (informational)
    model.safetensors  (+ model.safetensors.index.json listing only the model shards)
      <layer>.weight          float8_e4m3fn (out, in)   FP8 layers
      <layer>.weight_scale    float32 (1,)              dequantization multiplier:
                                                          W = weight.astype(f32) * weight_scale
      (no <layer>.input_scale: activations are scaled dynamically, amax / 448 per tensor)
      everything else         --dtype: embeddings, norms, lm_head, unconverted layers
    falqon_extras.safetensors  (not in the index, so serving stacks never load it)
      <layer>.falqon_a        float8_e4m3fn (rank, in)  FALQON's frozen A rows, same scale
      lm_head.weight, lm_head.weight_scale, lm_head.falqon_a
                              an FP8 lm_head (``--targets ... lm_head``): serving stacks
                              keep lm_head unquantized, so model.safetensors holds it
                              dequantized (FALQON: DQ(w8[:out]), without b) and its FP8
                              data lives here
    adapter_config.json, adapter_model.safetensors
                              only when some FALQON layer has a non-zero b: a PEFT LoRA
                              adapter on the FP8 base, loaded with
                              ``PeftModel.from_pretrained(base_model, out)`` (transformers'
                              ``from_pretrained(out)`` picks it up too; not tested here)
      base_model.model.<layer>.lora_A.weight  float32 (rank, in)  DQ(w8[out:]) = A
      base_model.model.<layer>.lora_B.weight  float32 (out, rank) b
                              for every FALQON layer (lm_head included), with r =
                              lora_alpha = rank (scaling 1), target_modules = their HF
                              module names, base_model_name_or_path "." (this directory)

For FALQON, ``weight`` is exactly ``w8[:out]`` with the layer's own ``scale``,
``falqon_a`` is ``w8[out:]`` and ``b`` is never dropped: the FP8 base plus the adapter
compute ``W + B A``, the effective weight (a serving stack that loads the base without
the adapter serves the model with ``b = 0``). :func:`load_fp8_export` rebuilds every melded
layer bit for bit, ``b`` included, as method ``falqon`` (live ``b``, ``b_in_forward=True``;
a proxy-rule model, whose ``b`` is zero, computes the same); ``--no-falqon-a`` leaves the A
rows out of the extras, and with an adapter they are recovered exactly from ``lora_A``.
``fp8_lora`` layers whose
``b`` is zero keep their FP8 bits; other FP8-method layers, ``fp8_lora`` with a non-zero
``b`` included, are re-quantized from their effective weight (no adapter: their ``B A`` is
merged into the FP8 weight). A model without FP8 layers (``full``, ``lora``, ``qlora``)
gets every decoder projection whose dimensions are multiples of 16 quantized per tensor
(scale = amax / 448).

Mistakes (unknown format, missing source, a non-empty ``--out``) end with one line on
stderr and exit code 2; nothing is overwritten.

Modules: :mod:`~falqon_jax.export.layout` (formats, file and tensor names),
:mod:`~falqon_jax.export.weights` (what each layer exports), :mod:`~falqon_jax.export.writer`
(:func:`export_model`), :mod:`~falqon_jax.export.reader` (:func:`load_fp8_export`) and
:mod:`~falqon_jax.export.cli` (the command line).
"""

from __future__ import annotations

from falqon_jax.export.layout import DTYPES, FORMAT_VERSION, FORMATS, ExportError
from falqon_jax.export.reader import load_fp8_export
from falqon_jax.export.weights import base_weight, effective_weight, fp8_weight
from falqon_jax.export.writer import export_model

__all__ = ["DTYPES", "FORMATS", "FORMAT_VERSION", "ExportError", "base_weight", "effective_weight",
           "export_model", "fp8_weight", "load_fp8_export"]
