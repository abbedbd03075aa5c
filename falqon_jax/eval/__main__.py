"""``python -m falqon_jax.eval``: score a model on lm-evaluation-harness tasks (see
:mod:`falqon_jax.eval.cli`)."""

import sys

from falqon_jax.cli import cpu_unless_gpu, quiet_output

cpu_unless_gpu()
quiet_output()

from falqon_jax.eval.cli import main  # noqa: E402

sys.exit(main())
