"""``python -m falqon_jax.export``."""

import sys

from falqon_jax.export.cli import main

sys.exit(main())
