"""``python -m falqon_jax.bench``."""

import sys

from falqon_jax.bench.cli import main

sys.exit(main())
