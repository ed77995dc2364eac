"""``python -m nlplatform.eval.harness ARGS``: lm-eval's command line with our model and tasks (``cli.py``)."""

import sys

from nlplatform.eval.harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
