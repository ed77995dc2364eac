"""Passwords in storage and tracking URLs are masked wherever the platform writes a URL."""

from __future__ import annotations

import pytest

from nlplatform.secrets import mask


@pytest.mark.parametrize(
    "text, masked",
    [
        ("postgresql://alice:S3cretPW@db.example:5432/optuna", "postgresql://alice:***@db.example:5432/optuna"),
        ("postgresql+psycopg://alice:p%40ss@db/optuna", "postgresql+psycopg://alice:***@db/optuna"),
        ("https://bob:tok-123@mlflow.example/", "https://bob:***@mlflow.example/"),
        ("error: 'mysql://u:pw@h/db' and http://x:y@z", "error: 'mysql://u:***@h/db' and http://x:***@z"),
        ("sqlite:////abs/path/mlruns.db", "sqlite:////abs/path/mlruns.db"),
        ("postgresql://alice@db/optuna", "postgresql://alice@db/optuna"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        (
            "nlplatform train r.yaml tracking.tracking_uri=http://u:secret@h:5000",
            "nlplatform train r.yaml tracking.tracking_uri=http://u:***@h:5000",
        ),
    ],
)
def test_mask_hides_the_password_of_every_url_and_nothing_else(text, masked):
    assert mask(text) == masked


def test_the_tracking_uri_becomes_an_mlflow_param_without_its_password():
    from nlplatform.config import RecipeConfig
    from nlplatform.tracking import recipe_params

    cfg = RecipeConfig()
    cfg.tracking.tracking_uri = "http://alice:S3cretPW@127.0.0.1:5000"
    params = recipe_params(cfg)
    assert params["tracking.tracking_uri"] == "http://alice:***@127.0.0.1:5000"
    assert not any("S3cretPW" in str(v) for v in params.values())


def test_eval_reaches_a_runs_password_store_through_the_environment_not_run_json():
    """run.json keeps the tracking URI masked; eval then logs through the current URI (MLFLOW_TRACKING_URI) when it
    is the same store with its password, uses an unmasked recorded URI as it is, and gives up (None) otherwise."""
    from nlplatform.eval.report import run_store

    saved = "http://alice:***@mlflow.example:5000"
    assert run_store(saved, "http://alice:S3cretPW@mlflow.example:5000") == "http://alice:S3cretPW@mlflow.example:5000"
    assert run_store(saved, "sqlite:///mlruns.db") is None
    assert run_store(saved, "http://alice:S3cretPW@other.example:5000") is None
    assert run_store("sqlite:////runs/mlruns.db", "http://x:y@z") == "sqlite:////runs/mlruns.db"
    assert run_store(None, "sqlite:///mlruns.db") == "sqlite:///mlruns.db"
