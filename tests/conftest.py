"""Test-wide settings: offline, every cache inside the workspace, Triton's CPU interpreter when there is no GPU.

These run before any test module imports torch, triton or the project (pytest imports conftest first).
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_CACHE = ROOT / ".cache"

os.environ.setdefault("NLPLATFORM_CACHE", str(_CACHE / "nlplatform"))  # absolute: CLI runs in tmp dirs share it
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

# Session fixtures that start a server or train a model: a test that uses one is slow whatever its own body does (it
# may be the one that pays for the fixture), so it is marked here rather than by hand.
SLOW_FIXTURES = {
    "postgres",
    "tracking_server",
    "trained_run",
    "trained_summary",
    "family_run",
    "three_trial_sweep",
    "mixed_sweep",
}


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` every test that uses a ``SLOW_FIXTURES`` fixture (`make test-fast` leaves slow tests out)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Each test starts from the same seed and default dtype, whatever the previous test did."""
    dtype = torch.get_default_dtype()
    torch.manual_seed(42)
    yield
    torch.set_default_dtype(dtype)


# ------------------------------------------------------------------------------------------- real servers (shared)


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL cluster for the session (``tests/servers.py``): fails, never skips, when PostgreSQL is missing,
    so that these tests run wherever the suite runs (`make test` installs it first)."""
    from tests.servers import start_postgres

    pg = start_postgres()
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def tracking_server(postgres, tmp_path_factory):
    """`make tracking-server` on a free port, its backend store a database of the session's PostgreSQL, its artifacts
    in a temporary folder: the shared training run, the two-process run, evaluation, sweeps and the leaderboard log to
    it over HTTP."""
    from tests.servers import start_tracking_server

    postgres.create_database("mlflow")
    folder = tmp_path_factory.mktemp("tracking-server")
    server = start_tracking_server(postgres.url("mlflow"), folder / "artifacts", folder / "server.log")
    yield server
    server.stop()


# ------------------------------------------------------------------------------------ trained checkpoints (shared)
# Real runs through the command line on the embedded corpus, trained once per session and reused by every folder.


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tracking_server):
    """A 30-step Transformer++ run (fast tiny overrides) through the real command line, tracked over HTTP by the
    session's tracking server (experiment "tests"). Returns (run_dir, tracking_uri, completed_process)."""
    from tests.train.conftest import FAST, TINY_RECIPE, corpus_ready, run_cli

    if not corpus_ready():
        pytest.skip("embedded corpus not fetched; run `make data` (make test does it first)")
    work = tmp_path_factory.mktemp("trained")
    uri = tracking_server.uri
    proc = run_cli(
        "train",
        str(TINY_RECIPE),
        *FAST,
        "trainer.max_steps=30",
        "trainer.val_check_interval=10",
        "trainer.log_every_n_steps=2",
        "optim.lr=1e-2",
        f"output_dir={work / 'runs'}",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=tests",
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    return run_dir, uri, proc


@pytest.fixture(scope="session")
def trained_summary(trained_run) -> dict:
    import json

    run_dir, _, _ = trained_run
    return json.loads((run_dir / "summary.json").read_text())


# The tiny recipes as written (tiny preset, their optimizer settings), on shorter and fewer windows so a run takes
# seconds on a CPU. Every family is well below its unigram perplexity by step 25 (val ppl 12-21 against 28.8), but
# Hope-Attention (full causal softmax attention, then the CMS) is slower to start: at step 30 it is still at 33.
FAMILY_RUN_STEPS = 30
FAMILY_RUN_STEPS_BY_RECIPE = {("hope", "tiny_attention"): 50}
FAMILY_RUN_OVERRIDES = [
    "data.seq_len=128",
    "data.batch_size=4",
    "data.val_batches=2",
    "optim.warmup_steps=5",
    "trainer.val_check_interval=15",
    "trainer.log_every_n_steps=1",  # the falling-loss tests compare the first steps with the last
    "trainer.enable_progress_bar=false",
    # Only last.ckpt: a tiny recipe's checkpoint is ~60 MB (GPT-2 vocabulary, Adam moments), and the session keeps
    # every family's run; a second, best-by-val copy would double the suite's disk use for no test.
    "trainer.save_top_k=0",
]


def family_run_steps(family: str, recipe: str = "tiny") -> int:
    return FAMILY_RUN_STEPS_BY_RECIPE.get((family, recipe), FAMILY_RUN_STEPS)


@pytest.fixture(scope="session")
def family_run(tmp_path_factory):
    """``family_run(name, recipe="tiny")`` -> (run_dir, tracking_uri, summary): ``family_run_steps(name, recipe)``
    steps of ``recipes/<name>/<recipe>.yaml`` through the command line, trained on first request and shared by the
    session."""
    import json

    from tests.train.conftest import corpus_ready, run_cli

    runs: dict[tuple[str, str], tuple[Path, str, dict]] = {}

    def get(family: str, recipe_name: str = "tiny") -> tuple[Path, str, dict]:
        key = (family, recipe_name)
        if key not in runs:
            if not corpus_ready():
                pytest.skip("embedded corpus not fetched; run `make data` (make test does it first)")
            work = tmp_path_factory.mktemp(f"{family}-{recipe_name}")
            uri = f"sqlite:///{work / 'mlruns.db'}"
            recipe = ROOT / "recipes" / family / f"{recipe_name}.yaml"
            steps = f"trainer.max_steps={family_run_steps(family, recipe_name)}"
            proc = run_cli(
                "train",
                str(recipe),
                *FAMILY_RUN_OVERRIDES,
                steps,
                f"output_dir={work / 'runs'}",
                f"tracking.tracking_uri={uri}",
                "tracking.experiment=tests",
                cwd=work,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            run_dir = Path(proc.stdout.strip().splitlines()[-1])
            runs[key] = (run_dir, uri, json.loads((run_dir / "summary.json").read_text()))
        return runs[key]

    return get
