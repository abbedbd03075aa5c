"""``python -m falqon_jax.export``."""

import sys

from falqon_jax.cli import cpu_unless_gpu, quiet_output

cpu_unless_gpu()
quiet_output()

from falqon_jax.export.cli import main  # noqa: E402

sys.exit(main())
