"""Evaluation with EleutherAI's lm-evaluation-harness (the ``eval`` extra): ``python -m
falqon_jax.eval`` and a training run's ``--eval-tasks``.

* :mod:`~falqon_jax.eval.scoring` -- the model's side, in token ids: log-likelihoods of
  continuations and greedy continuations in length-bucketed, sorted batches (the project's
  own forward and generation; no lm-eval);
* :mod:`~falqon_jax.eval.lm` -- :class:`~falqon_jax.eval.lm.FalqonLM`, the model as an
  ``lm_eval.api.model.TemplateLM``, tokenizing as lm-eval's ``hf`` backend does;
* :mod:`~falqon_jax.eval.harness` -- tasks (``--include-path``), one
  ``lm_eval.simple_evaluate`` call, the results (table, JSON, summary line), and the end of
  a training run;
* :mod:`~falqon_jax.eval.cli` -- the command line (``--recipe`` included).

Importing this package does not import lm-eval (``--help`` works without it).
"""
