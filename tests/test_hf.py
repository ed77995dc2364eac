"""Hugging Face interop: every family exports to a ``transformers`` folder that loads back through the Auto classes
(registered by ``nlplatform.hf``, or by ``trust_remote_code`` in a process that never imported nlplatform), computes
our logits, generates what ``nlplatform generate`` does and scores with lm-eval's own ``hf`` backend as our adapter
does. Models: each family at random initialisation (small sizes; one of them with a BPE tokenizer) and two trained
runs (Transformer++ and HOPE, shared with the rest of the suite).

Tolerance: the exported model runs the very same module on the same weights, so logits and loglikelihoods are
compared to 1e-6 (they agree exactly on this machine); generation and token ids must be identical."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from nlplatform import registry
from nlplatform.checkpoint import load_checkpoint
from nlplatform.cli import main
from nlplatform.export import export
from nlplatform.recipe import recipe_from_dict, recipe_to_dict
from tests.eval.conftest import needs_eval_data

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"d_model": 64, "n_layers": 2, "n_heads": 4}
TOL = 1e-6
PROMPT = "To be, or not to be: that is"
# HOPE learns from every 64-token chunk once the token after it is in: 90 tokens cross one such boundary
IDS = torch.randint(0, 257, (1, 90), generator=torch.Generator().manual_seed(0))
REQUESTS = [("To be, or not", " to be"), ("The king", " is dead."), ("", "Once upon a time"), ("A\nB", "\nC")]


def _checkpoint(folder: Path, family: str, tokenizer: str = "bytes", **model: object) -> Path:
    """A random-initialised checkpoint as training writes it (recipe, model weights, format), with a bytes or a
    freshly trained BPE tokenizer beside it; ``model``: more model fields."""
    from nlplatform.data.tokenizer import Tokenizer, train_bpe

    folder.mkdir(parents=True)
    spec, vocab = "bytes", 257
    if tokenizer == "bpe":
        texts = [PROMPT, "Once upon a time there was a king.", "The quick brown fox jumps over the lazy dog."] * 20
        backend = train_bpe(texts, 300)
        tok = Tokenizer(backend, name="bpe", eot_id=backend.token_to_id("<|endoftext|>"))
        spec, vocab = tok.save(folder), tok.vocab_size
    recipe = recipe_from_dict(
        {
            "model": {"name": family, "preset": "tiny", "vocab_size": vocab, **SMALL, **model},
            "data": {"seq_len": 128, "tokenizer": "bpe" if tokenizer == "bpe" else "bytes"},
        }
    )
    torch.manual_seed(0)
    model = registry.build_model(recipe.model)
    state = {
        "hyper_parameters": {"recipe": recipe_to_dict(recipe), "tokenizer": spec},
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "model_format": registry.get_spec(family).format_version,
        "global_step": 0,
    }
    torch.save(state, folder / "last.ckpt")
    return folder / "last.ckpt"


# random-init cases beyond one per family: (family, tokenizer, model fields)
EXTRA = {"deltanet-bpe": ("deltanet", "bpe", {}), "hope-attention": ("hope", "bytes", {"variant": "attention"})}
CASES = [*registry.FAMILIES, *EXTRA, "trained-transformer", "trained-hope"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_run, family_run):
    """case -> (checkpoint, exported folder), made on first request."""
    root = tmp_path_factory.mktemp("hf")
    made: dict[str, tuple[Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in made:
            if case == "trained-transformer":
                ckpt = trained_run[0] / "checkpoints" / "last.ckpt"
            elif case == "trained-hope":
                ckpt = family_run("hope")[0] / "checkpoints" / "last.ckpt"
            else:
                family, tok, fields = EXTRA.get(case, (case, "bytes", {}))
                ckpt = _checkpoint(root / case, family, tok, **fields)
            made[case] = ckpt, export(ckpt, root / f"{case}-hf")
        return made[case]

    return get


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_an_exported_folder_loads_through_the_auto_classes_with_our_logits(exported, case):
    from transformers import AutoConfig, AutoModelForCausalLM

    import nlplatform.hf  # noqa: F401  (registers the Auto classes)

    ckpt, folder = exported(case)
    ours = load_checkpoint(ckpt).model
    theirs = AutoModelForCausalLM.from_pretrained(folder)
    family = ours.cfg.name
    assert type(theirs).__name__ == json.loads((folder / "config.json").read_text())["architectures"][0]
    assert AutoConfig.from_pretrained(folder).model_type == f"nlplatform-{family}"
    ids = IDS % ours.cfg.vocab_size
    assert torch.allclose(_logits(theirs, ids), _logits(ours, ids), atol=TOL, rtol=0)
    if family == "hope":  # the freeze switch is a config field
        frozen = AutoModelForCausalLM.from_pretrained(folder, test_time_learning=False)
        ours.set_test_time_learning(False)
        assert torch.allclose(_logits(frozen, ids), _logits(ours, ids), atol=TOL, rtol=0)
        assert not torch.allclose(_logits(frozen, ids), _logits(theirs, ids), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_greedy_generate_equals_nlplatform_generate(exported, case, capsys):
    """transformers' generate() (the family's state in a StateCache) against ``nlplatform generate --temperature 0``
    on the checkpoint and on the exported folder: the same text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nlplatform.hf  # noqa: F401

    ckpt, folder = exported(case)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == load_checkpoint(ckpt).tokenizer.encode(PROMPT)
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    theirs = tok.decode(out[0])
    for source in (ckpt, folder):
        assert main(["generate", str(source), "--prompt", PROMPT, "--max-new-tokens", "24", "--temperature", "0"]) == 0
        assert capsys.readouterr().out.rstrip("\n") == theirs


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_lm_eval_hf_backend_scores_like_our_adapter(exported, case):
    """lm-eval's own ``hf`` backend on the exported folder (trust_remote_code, batch size 1) and our adapter on the
    checkpoint: the same loglikelihoods and greedy flags."""
    from lm_eval.models.huggingface import HFLM

    from nlplatform.eval.harness.adapter import NLPlatformLM

    ckpt, folder = exported(case)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(REQUESTS)]
    hf = HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=1, device="cpu")
    ours = NLPlatformLM(pretrained=str(ckpt), batch_size=1, device="cpu")
    for (a, greedy_a), (b, greedy_b) in zip(hf.loglikelihood(requests), ours.loglikelihood(requests)):
        assert abs(a - b) <= TOL * max(1.0, abs(b)) and greedy_a == greedy_b


@pytest.mark.slow
def test_a_fresh_process_loads_every_family_with_trust_remote_code_alone(exported, tmp_path):
    """A script that imports only transformers (nlplatform installed, not imported) loads each folder with
    trust_remote_code=True and gets our logits."""
    folders = {case: exported(case)[1] for case in registry.FAMILIES}
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
assert "nlplatform" not in sys.modules
out = {{}}
for case, folder in {json.dumps({k: str(v) for k, v in folders.items()})}.items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        out[case] = model(torch.load({str(tmp_path / "ids.pt")!r})).logits
torch.save(out, {str(tmp_path / "logits.pt")!r})
"""
    torch.save(IDS, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "logits.pt", weights_only=True)
    for case in registry.FAMILIES:
        assert torch.allclose(theirs[case], _logits(load_checkpoint(exported(case)[0]).model, IDS), atol=TOL, rtol=0)


def test_the_exported_tokenizer_gives_our_ids_for_bytes_and_bpe(exported):
    from transformers import AutoTokenizer

    text = "Ünïcödé ✓ 😀\n\ttabs  and <|endoftext|> as text, \x00\x7f"
    for case in ("transformer", "deltanet-bpe"):
        ckpt, folder = exported(case)
        ours = load_checkpoint(ckpt).tokenizer
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        assert tok(text).input_ids == ours.encode(text)
        assert tok.eos_token_id == ours.eot_id and tok.decode(ours.encode(text)) == ours.decode(ours.encode(text))


def test_the_model_card_names_the_run_and_its_figures(exported, trained_summary):
    ckpt, folder = exported("trained-transformer")
    card = (folder / "README.md").read_text()
    config = json.loads((folder / "config.json").read_text())
    assert config["training"]["mlflow_run_id"] == trained_summary["mlflow_run_id"] and config["training"]["step"] > 0
    for fragment in (
        "| family | transformer |",
        f"{trained_summary['val_ppl']:.3f}",
        trained_summary["mlflow_run_id"],
        f"{trained_summary['tokens_seen']:,}",
        "## Levels",
        "## Recipe",
        "trust_remote_code=True",
    ):
        assert fragment in card
    assert all(oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask()) for p in folder.iterdir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_folder_with_a_missing_or_corrupt_weight_file_is_refused_in_one_line(exported, tmp_path, damage, capsys):
    folder = tmp_path / "broken"
    shutil.copytree(exported("transformer")[1], folder)
    weights = folder / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    for argv in (
        ["generate", str(folder), "--prompt", "x", "--max-new-tokens", "2"],
        ["eval", str(folder), "--suite", "commonsense", "--limit", "1", "--no-track"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "model.safetensors" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no results written beside it


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_behind_on_failure(exported, tmp_path, capsys):
    ckpt, _ = exported("transformer")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["export", str(ckpt), str(taken)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    assert main(["export", str(tmp_path / "gone.ckpt"), str(tmp_path / "out")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no folder, no staging left


def test_transformers_never_takes_our_kernels_package_for_its_own():
    """Our top-level ``kernels`` (Triton ops) shares its name with Hugging Face's hub-kernels package, which
    transformers probes for: it must find ours (reported under our distribution's version) unusable, so no quantizer
    or layer ever imports from it."""
    import importlib.util

    from transformers.utils import import_utils

    assert Path(importlib.util.find_spec("kernels").origin).parent == ROOT / "kernels"
    _, version = import_utils._is_package_available("kernels", return_version=True)
    assert not import_utils.is_kernels_available(), version


@pytest.mark.slow
def test_importing_nlplatform_does_not_import_transformers():
    code = "import sys, nlplatform, nlplatform.cli, nlplatform.checkpoint; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
@needs_eval_data
def test_nlplatform_eval_scores_an_exported_folder_as_its_checkpoint(exported, tmp_path, capsys):
    """The smoke suite on the folder and on its checkpoint: the same scores; the folder's JSON beside it."""
    ckpt, folder = exported("trained-transformer")
    (tmp_path / "ckpt").mkdir()
    local_ckpt, local = tmp_path / "ckpt" / "last.ckpt", tmp_path / "hf"
    shutil.copy(ckpt, local_ckpt)
    shutil.copytree(folder, local)
    scores = []
    for source in (local_ckpt, local):
        assert main(["eval", str(source), "--suite", "smoke", "--limit", "2", "--no-track"]) == 0
        path = Path(capsys.readouterr().out.strip().splitlines()[-1])
        scores.append(json.loads(path.read_text())["metrics"])
    assert path == tmp_path / "eval-smoke-hf.json"
    assert scores[0] == scores[1] and scores[0]


@pytest.mark.slow
@needs_eval_data
def test_lm_eval_command_line_scores_a_folder_with_its_hf_backend_as_with_ours(exported, tmp_path):
    """``python -m nlplatform.eval.harness`` keeps lm-eval's own backends: ``--model hf`` on the exported folder and
    ``--model nlplatform`` on it give the same scores on our offline tasks (a loglikelihood task and the held-out
    corpus's rolling perplexity)."""
    _, folder = exported("trained-transformer")
    results = {}
    for model, extra in (("hf", ",trust_remote_code=True"), ("nlplatform", "")):
        out = tmp_path / model
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "nlplatform.eval.harness",
                "--model",
                model,
                "--model_args",
                f"pretrained={folder}{extra}",
                "--tasks",
                "arc_easy,heldout_corpus",
                "--limit",
                "3",
                "--batch_size",
                "1",
                "--device",
                "cpu",
                "--output_path",
                str(out),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        (path,) = out.rglob("results_*.json")
        results[model] = json.loads(path.read_text())["results"]
    for task in ("arc_easy", "heldout_corpus"):
        ours = {k: v for k, v in results["nlplatform"][task].items() if isinstance(v, float)}
        assert ours and all(abs(results["hf"][task][k] - v) <= TOL * max(1.0, abs(v)) for k, v in ours.items())


def test_generation_a_state_cannot_follow_is_refused_with_what_works(exported):
    """Beam search would reorder the state and a padded batch would feed it padding: both are refused by name, while
    an unpadded batch samples."""
    from transformers import AutoModelForCausalLM

    import nlplatform.hf  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(exported("hope")[1])
    ids = IDS[:, :8].repeat(2, 1)
    with pytest.raises(NotImplementedError, match="no beam search"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, num_beams=2)
    padded = torch.ones_like(ids)
    padded[0, 0] = 0
    with pytest.raises(ValueError, match="padded batch"):
        model.generate(ids, attention_mask=padded, max_new_tokens=2)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=True, top_k=5)
    assert out.shape == (2, 11)
