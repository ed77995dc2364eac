"""``python -m bench.ops``: see ``bench/ops/__init__.py``."""

import sys

from bench.ops import main

sys.exit(main())
