"""Load a trained model from a training checkpoint without Lightning (generation, evaluation, scripts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nlplatform.config import RecipeConfig, recipe_from_dict
from nlplatform.errors import UserError


@dataclass
class LoadedModel:
    model: nn.Module
    recipe: RecipeConfig
    tokenizer: object  # nlplatform.data.tokenizer.Tokenizer
    step: int


def _tokenizer_for(spec: str, ckpt: Path):
    from nlplatform.data.tokenizer import load_tokenizer

    if spec.startswith("file:") and not Path(spec[5:]).is_file():
        # The run folder may have moved since training: look for the tokenizer beside the checkpoint's run.
        for candidate in (ckpt.parent.parent / "tokenizer.json", ckpt.parent / "tokenizer.json"):
            if candidate.is_file():
                spec = f"file:{candidate}"
                break
    return load_tokenizer(spec)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a training checkpoint in eval mode, with its recipe and tokenizer."""
    from nlplatform.models.base import flush_denormals
    from nlplatform.registry import build_model, check_model_format

    flush_denormals()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    hparams = state.get("hyper_parameters") or {}
    if "recipe" not in hparams:
        raise UserError(f"{path} is not an nlplatform training checkpoint (it has no recipe)")
    recipe = recipe_from_dict(hparams["recipe"])
    check_model_format(recipe.model.name, state.get("model_format"), f"checkpoint {path}")
    model = build_model(recipe.model)
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights)
    try:
        model.to(device).eval()
    except (RuntimeError, AssertionError, ValueError) as exc:  # unknown device string, CUDA not available, ...
        raise UserError(f"cannot place the model on device {device!r}: {str(exc).splitlines()[0]}") from None
    tokenizer = _tokenizer_for(hparams.get("tokenizer", "bytes"), path)
    return LoadedModel(model=model, recipe=recipe, tokenizer=tokenizer, step=int(state.get("global_step", 0)))
