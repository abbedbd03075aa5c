"""``python -m falqon_jax.train``: fine-tune a LLaMA (see :mod:`falqon_jax.train.run`)."""

import sys

from falqon_jax.cli import cpu_unless_gpu, quiet_output

cpu_unless_gpu()
quiet_output()

from falqon_jax.train.run import main  # noqa: E402

sys.exit(main())
