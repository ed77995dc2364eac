"""Data-parallel training with nested levels, on CPU processes (gloo): what a multi-GPU run must get right.

A 2-process DDP run with a batch of b per rank and a 1-process run with a batch of 2b see the same global batches (the
sampler's global stream does not depend on the world size), so after the same optimizer steps they must hold the
same parameters, up to float32 reduction order. Tiny HOPE is set up so that its persistent CMS level ``cms.1``
(chunk 512 tokens, T_step = 64 x 4 = 256) steps every 2 optimizer steps: its held-back, summed gradients are tested
too. The runs differ only in the order of float32 additions (the all-reduce, the per-rank loss means), but AdamW
divides by sqrt(v) + eps, so where a gradient entry is almost zero that noise can move a parameter by a fraction of
a step (AdamW's first steps move an entry by lr * g / (|g| + eps), about lr * sign(g), whatever |g|; measured: 78 of
186,234 entries of tiny HOPE beyond 1e-6, the largest 2.4e-4, all in rarely stepped CMS weights). Tolerance after 4
steps at lr 3e-3: every entry within 3e-4 (a tenth of one step) and at least 99.9% of entries within 1e-6; losses
within 1e-5.

FSDP needs a GPU in Lightning (it refuses the CPU accelerator), so its check is GPU-marked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlplatform.recipe import load_recipe
from nlplatform.train.run import train
from tests.train.conftest import FAST, ROOT, TINY_RECIPE, needs_corpus, run_cli

pytestmark = needs_corpus

HOPE_RECIPE = ROOT / "recipes" / "hope" / "tiny.yaml"
# Tiny HOPE shrunk to seconds per run, with a persistent CMS level that steps every 2 optimizer steps.
HOPE = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.memory_chunk_size=16",
    "model.projection_chunk_size=16",
    "model.cms_chunk_sizes=[32,512]",
    "data.seq_len=64",
    "data.val_batches=2",
    "optim.warmup_steps=2",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.save_top_k=-1",
    "trainer.enable_progress_bar=false",
]
DDP = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]


def _ckpt(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


def _losses(state: dict) -> list[tuple[int, float]]:
    return [tuple(x) for x in state["callbacks"]["History"]["train"]]


def _assert_same_parameters(a: dict, b: dict) -> None:
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    close, total = 0, 0
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=3e-4, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
        diff = (sa[key].double() - sb[key].double()).abs()
        close, total = close + int((diff <= 1e-6).sum()), total + diff.numel()
    assert close >= 0.999 * total, f"only {close} of {total} entries within 1e-6"


def _train_in_process(tmp_path: Path, recipe: Path, *overrides: str):
    return train(load_recipe(recipe, [f"output_dir={tmp_path / 'runs'}", "tracking.enabled=false", *overrides]))


@pytest.fixture(scope="module")
def hope_ddp(tmp_path_factory, tracking_server):
    """Tiny HOPE, 2 processes x batch 2, 4 steps, tracked over HTTP by the session's tracking server (experiment
    "ddp"). Returns (run_dir, tracking_uri, work)."""
    work = tmp_path_factory.mktemp("hope-ddp")
    uri = tracking_server.uri
    proc = run_cli(
        "train",
        str(HOPE_RECIPE),
        *HOPE,
        *DDP,
        "data.batch_size=2",
        f"output_dir={work / 'runs'}",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=ddp",
        "tracking.system_metrics_every_s=1",
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1]), uri, work


@pytest.fixture(scope="module")
def hope_single(tmp_path_factory):
    """The same training on 1 process with batch 4: the same global batches."""
    work = tmp_path_factory.mktemp("hope-single")
    return _train_in_process(work, HOPE_RECIPE, *HOPE, "data.batch_size=4", "tracking.run_name=single").run_dir


@pytest.mark.slow
def test_two_process_hope_matches_one_process_with_a_slow_level_that_stepped(hope_ddp, hope_single):
    """2 ranks x batch 2 == 1 rank x batch 4 for tiny HOPE: same parameters, same losses, cms.1 stepped twice."""
    ddp, single = _ckpt(hope_ddp[0]), _ckpt(hope_single)
    assert ddp["global_step"] == single["global_step"] == 4
    assert ddp["level_scheduler"]["periods"]["cms.1"] == 2
    assert ddp["level_scheduler"]["updates"] == single["level_scheduler"]["updates"] == {"cms.1": 2, "weights": 4}
    _assert_same_parameters(ddp, single)
    (steps_a, loss_a), (steps_b, loss_b) = zip(*_losses(ddp)), zip(*_losses(single))
    assert steps_a == steps_b == (1, 2, 3, 4)
    assert loss_a == pytest.approx(loss_b, abs=1e-5)


def test_two_process_run_is_one_mlflow_run_recording_world_size_strategy_and_system_metrics(hope_ddp):
    """One MLflow run, not two; tagged with world size and strategy; its train loss is the global batch's (the
    mean over ranks, as in the checkpoint's history); system metrics were logged into it."""
    from mlflow.tracking import MlflowClient

    run_dir, uri, _ = hope_ddp
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.info.run_id == summary["mlflow_run_id"]
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp"
    assert run.data.tags["world_size"] == "2" and run.data.tags["strategy"] == "ddp"
    logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    history = _losses(_ckpt(run_dir))
    torch.testing.assert_close(torch.tensor([v for _, v in logged]), torch.tensor([v for _, v in history]))
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics), sorted(run.data.metrics)
    assert summary["tokens_seen"] == 4 * 64 * 2 * 2


def _stopped_at_step_2(run_dir: Path, dest: Path) -> Path:
    """A copy of the run as a job killed right after its step-2 checkpoint would have left it."""
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "recipe.yaml", dest / "recipe.yaml")
    step2 = next((run_dir / "checkpoints").glob("step000002-*.ckpt"))
    shutil.copy(step2, dest / "checkpoints" / "last.ckpt")  # what the killed job's last checkpoint was
    return dest / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_ddp_run_resumed_from_its_step_2_checkpoint_continues_with_the_same_losses(hope_ddp, tmp_path):
    """Resumed under DDP at step 2, the run's steps 3 and 4 have the uninterrupted run's losses and parameters."""
    run_dir, _, _ = hope_ddp
    ckpt = _stopped_at_step_2(run_dir, tmp_path / "resumed")
    proc = run_cli(
        "train",
        str(HOPE_RECIPE),
        *HOPE,
        *DDP,
        "data.batch_size=2",
        f"output_dir={tmp_path / 'runs'}",
        "tracking.enabled=false",
        f"trainer.resume={ckpt}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 2" in proc.stderr
    resumed, straight = _ckpt(tmp_path / "resumed"), _ckpt(run_dir)
    assert [s for s, _ in _losses(resumed)] == [1, 2, 3, 4]
    assert [v for _, v in _losses(resumed)] == pytest.approx([v for _, v in _losses(straight)], rel=1e-6)
    _assert_same_parameters(resumed, straight)


def test_two_process_checkpoint_resumes_on_one_process_at_the_next_global_batch(hope_ddp, tmp_path):
    """A 2-rank run's step-2 checkpoint resumed on 1 rank (batch 4) trains steps 3 and 4 on the same data: the
    checkpoint carries the windows consumed, not a per-rank count."""
    run_dir, _, _ = hope_ddp
    ckpt = _stopped_at_step_2(run_dir, tmp_path / "runs" / "tiny" / "resumed")
    _train_in_process(tmp_path, HOPE_RECIPE, *HOPE, "data.batch_size=4", f"trainer.resume={ckpt}")
    resumed, straight = _ckpt(tmp_path / "runs" / "tiny" / "resumed"), _ckpt(run_dir)
    assert [s for s, _ in _losses(resumed)] == [1, 2, 3, 4]
    assert [v for _, v in _losses(resumed)] == pytest.approx([v for _, v in _losses(straight)], abs=1e-5)
    _assert_same_parameters(resumed, straight)


@pytest.mark.slow
def test_torchrun_launch_of_transformer_matches_one_process_in_one_run_folder(tmp_path):
    """The documented torchrun launch (2 processes on this machine, Lightning detects torchrun's environment) trains
    tiny Transformer++ as one run folder whose tokens count both ranks, to the parameters of 1 process x batch 8."""
    common = [*FAST, "trainer.max_steps=4", "trainer.val_check_interval=2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "nlplatform",
            "train",
            str(TINY_RECIPE),
            *common,
            *DDP,
            "data.batch_size=4",
            f"output_dir={tmp_path / 'ddp'}",
            "tracking.enabled=false",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert [p.name for p in (tmp_path / "ddp" / "tiny").iterdir()] == [run_dir.name]
    assert json.loads((run_dir / "summary.json").read_text())["tokens_seen"] == 4 * 64 * 4 * 2
    single = _train_in_process(tmp_path, TINY_RECIPE, *common, "data.batch_size=8", "tracking.run_name=single")
    _assert_same_parameters(_ckpt(run_dir), _ckpt(single.run_dir))


def test_fsdp_on_the_cpu_is_refused_with_a_clear_message(tmp_path):
    """Lightning's FSDP needs CUDA: asking for it on the CPU is bad input (exit 2), not a traceback."""
    from nlplatform.errors import ConfigError
    from nlplatform.train.run import build_trainer

    cfg = load_recipe(TINY_RECIPE, [*FAST, "trainer.strategy=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"])
    with pytest.raises(ConfigError, match="requires a GPU"):
        build_trainer(cfg, tmp_path, None, [])


@pytest.mark.gpu
def test_fsdp_hope_matches_a_single_device_run(tmp_path):
    """On CUDA, FSDP over 2 GPUs (1 when only one is visible) trains tiny HOPE (fp32) to the parameters of a plain
    single-device run over the same global batches of 4, with the slow CMS level held back and released."""
    n = min(2, torch.cuda.device_count())
    gpu = ["trainer.accelerator=gpu", "trainer.precision=32-true"]
    proc = run_cli(
        "train",
        str(HOPE_RECIPE),
        *HOPE,
        *gpu,
        f"trainer.devices={n}",
        "trainer.strategy=fsdp",
        f"data.batch_size={4 // n}",
        f"output_dir={tmp_path / 'fsdp'}",
        "tracking.enabled=false",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = _train_in_process(tmp_path, HOPE_RECIPE, *HOPE, *gpu, "trainer.devices=1", "data.batch_size=4")
    fsdp = _ckpt(Path(proc.stdout.splitlines()[-1]))
    assert fsdp["level_scheduler"]["updates"] == {"cms.1": 2, "weights": 4}
    _assert_same_parameters(fsdp, _ckpt(single.run_dir))


KILL_SCRIPT = '''
import os, signal, sys
import lightning as L
from nlplatform.recipe import load_recipe
from nlplatform.train.run import train


class SigkillAt(L.Callback):
    """Rank 0 dies by SIGKILL at the start of step {step} + 1, as a node lost mid-run would."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == {step} and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)


train(load_recipe(sys.argv[1], sys.argv[2:]), callbacks=(SigkillAt(),))
'''


@pytest.mark.slow
def test_two_process_run_killed_by_sigkill_resumes_with_auto_to_the_uninterrupted_losses(tmp_path):
    """2 processes (gloo), a checkpoint every step; rank 0 is SIGKILLed at the start of step 4 (a fixed step), the
    other rank dies with the process group. ``trainer.resume=auto`` takes over the dead run's stale lock and continues
    it: steps 1..6 have the losses of an uninterrupted 2-process run within 1e-6 (the same operations in the same
    order: only float32 round-off of the resumed optimizer state could differ, and it does not)."""
    common = [
        *FAST,
        "data.batch_size=2",
        *DDP,
        "tracking.enabled=false",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        f"output_dir={tmp_path / 'runs'}",
    ]
    straight = run_cli("train", str(TINY_RECIPE), *common, "tracking.run_name=straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    script = tmp_path / "kill_at_step_3.py"
    script.write_text(KILL_SCRIPT.replace("{step}", "3"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [
            sys.executable,
            str(script),
            str(TINY_RECIPE),
            *common,
            "tracking.run_name=killed",
            "trainer.checkpoint_every_steps=1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode != 0
    run_dir = tmp_path / "runs" / "tiny" / "killed"
    assert _ckpt(run_dir)["global_step"] == 3 and (run_dir / "run.lock").exists()  # the dead process's lock
    resumed = run_cli(
        "train",
        str(TINY_RECIPE),
        *common,
        "tracking.run_name=killed",
        "trainer.resume=auto",
        "trainer.checkpoint_every_steps=1",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "no longer runs" in resumed.stderr and "resuming from" in resumed.stderr and "at step 3" in resumed.stderr
    got, want = _losses(_ckpt(run_dir)), _losses(_ckpt(tmp_path / "runs" / "tiny" / "straight"))
    assert [s for s, _ in got] == list(range(1, 7))
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert not (run_dir / "run.lock").exists()


@pytest.mark.slow
def test_torchrun_launch_prepares_a_new_corpus_once_on_rank_0(tmp_path):
    """Under torchrun every process starts at once: global rank 0 builds the token cache of a corpus nobody prepared
    while rank 1 waits, then both check they see it (one "data ready" line, not one per rank)."""
    from tests.data.conftest import generate_docs

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(generate_docs(20, words=400)):
        (corpus / f"doc{i:02d}.txt").write_text(doc)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "NLPLATFORM_CACHE": str(tmp_path / "c")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "nlplatform",
            "train",
            str(TINY_RECIPE),
            *FAST,
            *DDP,
            "data.batch_size=2",
            "data.val_batches=1",
            "trainer.max_steps=1",
            f"data.paths=[{corpus}]",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
            f"output_dir={tmp_path / 'runs'}",
            "tracking.enabled=false",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("nlplatform: data ready in") == 1, proc.stderr[-3000:]
    caches = [p.name for p in (tmp_path / "c" / "tokens").iterdir() if not p.name.startswith(".")]  # not the lock
    assert len(caches) == 1, caches
