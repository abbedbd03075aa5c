"""Training: ``python -m falqon_jax.train`` and its Python API, :func:`finetune`.

* :mod:`~falqon_jax.train.config` -- every setting of a run (:class:`TrainConfig`),
  defaults, recipes and flags;
* :mod:`~falqon_jax.train.data` -- instruction data sets (Alpaca, OpenAssistant, chat
  messages, prompt/completion), tokenization, loss masks, batches;
  :mod:`~falqon_jax.train.demo_data` -- the built-in demo's data and character tokenizer;
* :mod:`~falqon_jax.train.trainer` -- the jitted, sharded train and eval steps;
* :mod:`~falqon_jax.train.checkpoints` -- Orbax checkpoints of the train state: the frozen
  part once per run, the changing part (:mod:`~falqon_jax.train.state_parts`) per save,
  asynchronously, with fingerprints (:mod:`~falqon_jax.train.fingerprint`);
* :mod:`~falqon_jax.train.stopping` -- Ctrl-C, SIGTERM and ``--max-time``: save and exit;
* :mod:`~falqon_jax.train.reporting` -- ``--report-to``: the metrics in TensorBoard, W&B;
* :mod:`~falqon_jax.train.grad_init` -- ``--init-a grad`` (A from loss gradients);
* :mod:`~falqon_jax.train.run` -- one run end to end (:func:`finetune`, :func:`main`): the
  command line, ``--resume`` and ``--plan``; a run's parts are
  :mod:`~falqon_jax.train.outdir` (what may be written to ``--out``, atomic writes),
  :mod:`~falqon_jax.train.prepare` (examples, tokenizer and model, checked),
  :mod:`~falqon_jax.train.loop` (the training loop and its four early exits),
  :mod:`~falqon_jax.train.samples` (held-out loss and a sample at the end) and
  :mod:`~falqon_jax.train.outcome` (exit codes, :class:`RunResult`, :class:`UserError`);
* :mod:`~falqon_jax.train.runs` -- reading a finished run's model back.

``python -m falqon_jax.train --help`` lists the flags. In Python::

    from falqon_jax.train import PAPER, finetune
    result = finetune(dataclasses.replace(PAPER, model="path/to/hf", data="alpaca.json",
                                          out="runs/a"))
    print(result.eval_loss)
"""

from falqon_jax.train.config import DEMO, PAPER, ConfigError, TrainConfig
from falqon_jax.train.data import DataError
from falqon_jax.train.run import RunResult, UserError, finetune, main

__all__ = ["DEMO", "PAPER", "ConfigError", "DataError", "RunResult", "TrainConfig", "UserError",
           "finetune", "main"]
