"""Load a trained model from a training checkpoint, or from a folder ``nlplatform export`` wrote, without Lightning
or ``transformers`` (generation, evaluation, scripts)."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nlplatform.config import RecipeConfig
from nlplatform.errors import UserError
from nlplatform.recipe import recipe_from_dict


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


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A checkpoint file's contents, loaded as data only (``weights_only=True``): tensors, numbers, strings and
    containers. A pickle that names any other Python object (which unpickling would import and call: code a crafted
    file can run) is refused before anything of it runs, with one line naming what it wanted; so is a file without
    the training recipe every nlplatform checkpoint holds."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = next((line for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise UserError(
            f"checkpoint {path} holds Python objects beyond tensors and plain data, which loading would run; "
            f"refusing it ({first.strip() or 'not loadable as data'})"
        ) from None
    except Exception as exc:  # a truncated file, not a checkpoint at all, ...
        raise UserError(
            f"cannot read checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    if not isinstance(state, dict) or "recipe" not in (state.get("hyper_parameters") or {}):
        raise UserError(f"{path} is not an nlplatform training checkpoint (it has no recipe)")
    return state


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a training checkpoint (or of an exported folder) in eval mode, with its recipe and tokenizer."""
    from nlplatform.models.base import flush_denormals
    from nlplatform.registry import build_model, check_model_format

    flush_denormals()
    path = Path(path)
    if path.is_dir():
        return load_export(path, device)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    state = read_checkpoint(path)
    hparams = state["hyper_parameters"]
    recipe = recipe_from_dict(hparams["recipe"], saved=True)
    check_model_format(recipe.model.name, state.get("model_format"), f"checkpoint {path}")
    model = build_model(recipe.model)
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights)
    _place(model, device)
    tokenizer = _tokenizer_for(hparams.get("tokenizer", "bytes"), path)
    return LoadedModel(model=model, recipe=recipe, tokenizer=tokenizer, step=int(state.get("global_step", 0)))


def _place(model: nn.Module, device: str | torch.device) -> None:
    try:
        model.to(device).eval()
    except (RuntimeError, AssertionError, ValueError) as exc:  # unknown device string, CUDA not available, ...
        raise UserError(f"cannot place the model on device {device!r}: {str(exc).splitlines()[0]}") from None


def load_export(folder: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a folder written by ``nlplatform export``: its ``config.json`` (the family's config, the masked
    recipe, the tokenizer kind, the model format), ``model.safetensors`` (read as data) and, for BPE, its
    ``tokenizer.json``. A folder that is not such an export, or whose weights are missing, truncated or of other
    shapes, is refused in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from nlplatform.data.tokenizer import Tokenizer, load_tokenizer
    from nlplatform.registry import build_model, check_model_format, config_from_fields

    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    try:
        config = json.loads(config_path.read_text())
        family = config["model_type"].removeprefix("nlplatform-")
        model_fields, recipe_dict = {**config["model"], "name": family}, config["recipe"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(
            f"{folder} is not a model folder written by `nlplatform export` (no readable config.json "
            "with an nlplatform model)"
        ) from None
    if not weights_path.is_file():
        raise UserError(f"{folder}: model.safetensors is missing")
    check_model_format(family, config.get("model_format"), f"model folder {folder}")
    recipe = recipe_from_dict(recipe_dict, saved=True)
    model = build_model(config_from_fields(model_fields))
    try:
        model.load_state_dict({k.removeprefix("model."): v for k, v in load_file(weights_path).items()})
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise UserError(f"{weights_path} cannot be loaded: {str(exc).strip().splitlines()[0]}") from None
    if hasattr(model, "set_test_time_learning"):
        model.set_test_time_learning(bool(config.get("test_time_learning", True)))
    _place(model, device)
    tokenizer = Tokenizer() if config.get("tokenizer", "bytes") == "bytes" else load_tokenizer(f"file:{folder}")
    step = int((config.get("training") or {}).get("step", 0))
    return LoadedModel(model=model, recipe=recipe, tokenizer=tokenizer, step=step)
