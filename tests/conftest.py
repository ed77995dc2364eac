"""Test-wide settings: offline, every cache inside the workspace, Triton's CPU interpreter when there is no GPU.

These run before any test module imports torch, triton or the project (pytest imports conftest first).
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_CACHE = ROOT / ".cache"

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(_CACHE / "huggingface"))
os.environ.setdefault("XDG_CACHE_HOME", str(_CACHE))
os.environ.setdefault("MPLCONFIGDIR", str(_CACHE / "matplotlib"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_CACHE / "torchinductor"))
os.environ.setdefault("TRITON_CACHE_DIR", str(_CACHE / "triton"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MLFLOW_TRACKING_URI from the caller's shell must not send test runs into the user's store.
os.environ.pop("MLFLOW_TRACKING_URI", None)

try:  # decide before any @triton.jit module is imported: the interpreter is read at decoration time
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Each test starts from the same seed and default dtype, whatever the previous test did."""
    dtype = torch.get_default_dtype()
    torch.manual_seed(42)
    yield
    torch.set_default_dtype(dtype)
