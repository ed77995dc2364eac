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
        ("nlplatform train r.yaml tracking.tracking_uri=http://u:secret@h:5000",
         "nlplatform train r.yaml tracking.tracking_uri=http://u:***@h:5000"),
    ],
)  # fmt: skip
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
