"""``python -m falqon_jax.train``: fine-tune a LLaMA (see :mod:`falqon_jax.train.run`)."""

import sys

from falqon_jax.train.run import main

sys.exit(main())
