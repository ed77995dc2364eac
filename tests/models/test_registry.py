"""The model registry: presets of every family, config errors with hints, and a light import graph."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from nlplatform import registry
from nlplatform.errors import ConfigError

PRESETS = [(family, preset) for family in registry.FAMILIES for preset in registry.get_spec(family).presets]


def nominal_params(preset: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([mb])", preset)
    if match is None:
        pytest.fail(f"preset {preset!r} is neither 'tiny' nor a size like '340m' / '1.3b'")
    return float(match.group(1)) * (1e6 if match.group(2) == "m" else 1e9)


@pytest.mark.parametrize(("family", "preset"), PRESETS, ids=[f"{f}-{p}" for f, p in PRESETS])
def test_every_preset_builds_on_meta_near_its_nominal_size(family, preset):
    """Each preset builds on the meta device; sized presets are within 15% of their name, tiny has 1M-10M params."""
    vocab = 257 if preset == "tiny" else 32000
    with torch.device("meta"):
        model = registry.build_model(registry.model_config(family, preset, vocab_size=vocab))
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    if hasattr(model, "num_params"):
        assert model.num_params() == n
    if preset == "tiny":
        assert 1e6 <= n <= 10e6, n
    else:
        nominal = nominal_params(preset)
        assert abs(n - nominal) <= 0.15 * nominal, f"{family} {preset}: {n:,} params"


def test_build_model_without_vocab_size_raises_config_error():
    """build_model refuses a config whose vocab_size is still unset."""
    with pytest.raises(ConfigError, match="vocab_size"):
        registry.build_model(registry.model_config("transformer", "tiny"))


def test_unknown_family_raises_config_error_with_a_suggestion():
    """A misspelt family name fails with "Did you mean" and the right name."""
    with pytest.raises(ConfigError, match="Did you mean 'transformer'"):
        registry.model_config("transfomer", "tiny")


@pytest.mark.parametrize(("typo", "right"), [("340M", "340m"), ("tiny ", "tiny"), ("1.3B", "1.3b")])
def test_unknown_preset_raises_config_error_with_a_suggestion(typo, right):
    """A near-miss preset name fails with "Did you mean" and the right preset."""
    with pytest.raises(ConfigError, match=f"Did you mean '{re.escape(right)}'"):
        registry.model_config("transformer", typo)


def test_unknown_config_key_raises_config_error_with_a_suggestion():
    """An override that is not a field of the family config fails with "Did you mean"."""
    with pytest.raises(ConfigError, match="Did you mean 'd_model'"):
        registry.model_config("transformer", "tiny", d_modle=64)


def test_preset_overrides_are_applied_and_validated():
    """Overrides replace preset values, and the family's own checks run on the result."""
    cfg = registry.model_config("transformer", "340m", vocab_size=32000, n_kv_heads=4)
    assert (cfg.d_model, cfg.n_kv_heads, cfg.preset) == (1024, 4, "340m")
    with pytest.raises(ConfigError, match="n_kv_heads"):
        registry.model_config("transformer", "340m", vocab_size=32000, n_kv_heads=5)


@pytest.mark.slow
def test_importing_models_and_layers_does_not_import_the_training_stack():
    """Importing the models, the layers, generate and the kernels pulls in none of lightning, mlflow, optuna, lm_eval."""
    code = (
        "import sys, nlplatform.models.transformer, nlplatform.models.deltanet, nlplatform.layers\n"
        "import nlplatform.generate, kernels.delta_rule\n"
        "heavy = ('lightning', 'pytorch_lightning', 'mlflow', 'optuna', 'lm_eval')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
