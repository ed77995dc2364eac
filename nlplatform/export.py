"""``nlplatform export CKPT OUT_DIR``: a training checkpoint as a Hugging Face ``transformers`` model folder.

The folder holds what ``AutoModelForCausalLM`` / ``AutoTokenizer`` and lm-eval's ``hf`` backend read::

    config.json             the family's config (model fields, masked recipe, tokenizer kind) and an ``auto_map``
    model.safetensors       the weights, as data (no pickle)
    generation_config.json  end-of-text as EOS and padding id
    tokenizer.json          a ``tokenizers`` file for BPE and bytes alike (+ tokenizer_config.json)
    hf_nlplatform.py        imports ``nlplatform.hf``: the classes ``trust_remote_code=True`` loads
    README.md               the model card: family, preset, parameters, levels, training, the recipe

It is written into a staging folder beside ``OUT_DIR`` and renamed into place when complete, so a failed export
leaves nothing behind, and an existing non-empty ``OUT_DIR`` is refused rather than overwritten. ``nlplatform eval``
and ``generate`` read such a folder as they read a checkpoint (``nlplatform.checkpoint.load_export``), without
``transformers``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from nlplatform.checkpoint import LoadedModel, load_checkpoint
from nlplatform.errors import UserError
from nlplatform.files import file_mode, fsync_dir, fsync_file, make_staging_dir
from nlplatform.recipe import recipe_to_dict, recipe_to_yaml

SHIM = "hf_nlplatform.py"
SHIM_TEXT = '''"""The model classes of this folder: ``trust_remote_code=True`` imports them from the installed nlplatform."""

from nlplatform.hf import *  # noqa: F401,F403
'''


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the model of ``checkpoint`` as a ``transformers`` folder at ``out_dir``; return the folder."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; choose a new folder to export into")
    loaded = load_checkpoint(checkpoint)
    try:
        from nlplatform import hf
    except ImportError as exc:
        raise UserError(f"export needs the hf extra ({exc.name} is missing): pip install -e '.[hf]'") from None
    staging = make_staging_dir(out)
    try:
        _write(loaded, Path(checkpoint), staging, hf)
        for path in staging.iterdir():  # files as any other the user writes (the umask's mode), on disk
            path.chmod(file_mode())
            fsync_file(path)
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write(loaded: LoadedModel, checkpoint: Path, folder: Path, hf) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from nlplatform.registry import get_spec

    recipe, model, tok = loaded.recipe, loaded.model, loaded.tokenizer
    family = recipe.model.name
    config_cls, model_cls = hf.classes_for(family)
    config = config_cls(
        model=dataclasses.asdict(recipe.model),
        recipe=recipe_to_dict(recipe, masked=True),
        tokenizer="bytes" if tok.backend is None else "file",
        test_time_learning=bool(getattr(model, "test_time_learning", True)),
        max_position_embeddings=recipe.data.seq_len,
        eos_token_id=tok.eot_id,
        pad_token_id=tok.eot_id,
        model_format=get_spec(family).format_version,
        training=training_facts(checkpoint, loaded.step),
    )
    config.architectures = [model_cls.__name__]
    config.auto_map = {
        "AutoConfig": f"{SHIM[:-3]}.{config_cls.__name__}",
        "AutoModelForCausalLM": f"{SHIM[:-3]}.{model_cls.__name__}",
    }
    wrapped = model_cls(config)
    wrapped.model.load_state_dict(model.state_dict())
    wrapped.generation_config = GenerationConfig(eos_token_id=tok.eot_id, pad_token_id=tok.eot_id)
    wrapped.save_pretrained(folder)
    backend = HFTokenizer.from_str(tok.backend_json())
    eot = backend.id_to_token(tok.eot_id)
    # bytes: literal "<|endoftext|>" in a text stays bytes, as the platform's own byte tokenizer encodes it
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eot,
        pad_token=eot,
        model_max_length=recipe.data.seq_len,
        split_special_tokens=tok.backend is None,
    )
    fast.save_pretrained(folder)
    (folder / SHIM).write_text(SHIM_TEXT)
    (folder / "README.md").write_text(model_card(loaded, config.training))


def training_facts(checkpoint: Path, step: int) -> dict:
    """Step, tokens seen, validation perplexity and MLflow run id of the checkpoint, from its run's ``summary.json``
    (when the summary is of this step) and ``run.json``; what the run folder does not say is left out."""
    run = checkpoint.resolve().parent.parent
    facts: dict = {"step": step, "checkpoint": checkpoint.name}
    summary = _json(run / "summary.json")
    if summary.get("steps") == step:
        facts |= {k: summary[k] for k in ("tokens_seen", "val_loss", "val_ppl") if summary.get(k) is not None}
    run_id = _json(run / "run.json").get("mlflow_run_id")
    if run_id:
        facts["mlflow_run_id"] = run_id
    return facts


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_card(loaded: LoadedModel, training: dict) -> str:
    """The folder's README.md."""
    from nlplatform.hf import classes_for

    recipe, model = loaded.recipe, loaded.model
    family = recipe.model.name
    _, model_cls = classes_for(family)
    params = sum(p.numel() for p in model.parameters())
    ppl = training.get("val_ppl")
    rows = [
        ("family", family),
        ("preset", recipe.model.preset),
        ("parameters", f"{params:,}"),
        ("training step", str(training["step"])),
        ("tokens seen", f"{training['tokens_seen']:,}" if "tokens_seen" in training else "not recorded"),
        ("validation perplexity", f"{ppl:.3f}" if ppl is not None else "not recorded"),
        ("MLflow run", training.get("mlflow_run_id", "not tracked")),
        ("tokenizer", loaded.tokenizer.name),
        ("training window", f"{recipe.data.seq_len} tokens"),
    ]
    levels = [f"| {lv.name} | {lv.scope} | {lv.chunk_size or 'every step'} | {lv.update} |" for lv in model.levels()]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [nlplatform, nested-learning, " + family.replace("_", "-") + "]",
        "---",
        "",
        f"# {family} {recipe.model.preset} ({model_cls.__name__})",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Levels",
        "",
        "| level | scope | chunk (tokens) | update |",
        "|---|---|---|---|",
        *levels,
        "",
        "## Use",
        "",
        "Needs `nlplatform` installed (its `hf` extra); the model code is the platform's own.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)',
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
        'ids = tok("To be, or not", return_tensors="pt").input_ids',
        "print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))",
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_to_yaml(recipe).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
