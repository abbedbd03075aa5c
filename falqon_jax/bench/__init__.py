"""Benchmarks of one training step per method: compiled-program counts and wall-clock speed.

Run ``python -m falqon_jax.bench SUBCOMMAND [flags]``:

* ``hlo``: lower and compile one train step per method -- for single linear layers and for
  a LLaMA-shaped decoder stack -- from abstract inputs (``jax.ShapeDtypeStruct``; nothing is
  allocated or executed) and report FP8 casts, GEMMs, XLA's memory analysis and cost
  analysis (the analysis of :func:`falqon_jax.bench.hlo.analyze`, plus large copies/transposes).
* ``speed``: run the same train steps on the default device and report the median
  wall-clock time per step, tokens/s and model-FLOPs utilisation against the device's
  bf16 and FP8 peaks. On a CPU the numbers say nothing about FP8 speed (FP8 is emulated).
* ``accuracy``: fine-tune a real pretrained model (SmolLM2-135M-Instruct by default) with
  every method and seed, and report the held-out loss per method, the fraction of LoRA's
  improvement recovered and FALQON's other update rules (see :mod:`falqon_jax.bench.accuracy`).

Methods (``--methods``): ``falqon`` (FALQON's default update rule), ``falqon_paper``,
``falqon_reference``, ``falqon_visible_merge``, ``falqon_paper_stochastic``,
``falqon_paper_feedback`` (its other rules, :data:`FALQON_RULES`), ``lora``, ``fp8_lora``,
``qlora``, ``full`` (see :mod:`falqon_jax.model.methods`). ``--json FILE`` writes a JSON list
with one object per (method, shape) row; the file is rewritten after every row, so an
interrupted run keeps the rows it finished.

What one "train step" is:

* Linear layer ``(out, in)`` with ``T`` tokens: the layer's share of a network's step. The
  step receives the input ``x`` ``(T, in)`` and the upstream gradient ``g = dL/dy``
  ``(T, out)`` (both bfloat16), returns ``y`` and ``dL/dx`` (both needed by the
  neighbouring layers, so neither GEMM can be optimised away), takes gradients of the
  trainable leaves only, and applies gradient clipping + AdamW to them -- plus, for the
  FALQON methods, :func:`falqon_jax.optax.falqon_update` with their rule (for the merging
  rules the proxy buffer and the top-k row merge into the FP8 weight). Params and optimizer
  state are donated.
* Model: a LLaMA decoder built from a model card (``--model-card``, default ``llama-7b``)
  with ``--model-layers`` decoder layers (default 2), next-token cross-entropy on a
  ``(batch, seq)`` token batch, the same optimizer. Adapter methods convert the seven
  decoder projections; embeddings, norms and ``lm_head`` stay frozen (``full`` trains all).

Counting conventions: FP8 casts and GEMMs are counted in the program *text*. The decoder
layers are one ``scan``, so for a model row every count -- and XLA's cost-analysis
``flops``, which also counts a loop body once -- covers one decoder layer plus what sits
outside the scan (``lm_head``, the loss, the optimizer and FALQON's merges). The analytic
``model_flops`` (:func:`falqon_jax.bench.cases.model_flops`) covers the whole step.

Modules: :mod:`~falqon_jax.bench.cases` (settings, methods, the benchmarked steps, analytic
FLOPs), :mod:`~falqon_jax.bench.hlo` (compiling the steps and counting them through
:mod:`falqon_jax.gpu_program`, the one HLO reader; ``hlo`` rows),
:mod:`~falqon_jax.bench.speed` (``speed`` rows, device peaks), :mod:`~falqon_jax.bench.accuracy`
(the fine-tuning study), :mod:`~falqon_jax.bench.collectives` (collectives of the sharded
train step), :mod:`~falqon_jax.bench.toy` (the toy MLP problem of ``python -m
falqon_jax.demo``) and :mod:`~falqon_jax.bench.cli` (the command line).
"""

