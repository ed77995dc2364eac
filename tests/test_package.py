"""Packaging guards."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_import_name_resolves_to_this_repository():
    """`import kernels` is our package, not the unrelated PyPI project of the same name."""
    import kernels

    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"


def test_importing_the_package_does_no_heavy_work():
    """`import nlplatform` pulls in neither torch nor lightning (commands import what they need lazily)."""
    code = "import sys, nlplatform, nlplatform.cli; print(sorted(m for m in ('torch', 'lightning', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_unknown_command_exits_2_with_usage():
    """An unknown command is rejected by the CLI with exit status 2 and a usage line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "nlplatform", "trian"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr


def test_models_command_lists_every_preset_with_its_parameter_count():
    """`nlplatform models` sizes every family's presets on the meta device and prints their parameter counts."""
    from nlplatform import registry

    proc = subprocess.run([sys.executable, "-m", "nlplatform", "models"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = {tuple(line.split()[:2]): line.split()[2] for line in proc.stdout.splitlines()[1:]}
    for name in registry.FAMILIES:
        for preset in registry.get_spec(name).presets:
            assert int(rows[(name, preset)].replace(",", "")) > 0
    assert rows[("transformer", "340m")] == "343,847,936"
