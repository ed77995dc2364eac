"""Credentials in URLs: ``postgresql://alice:PASSWORD@host/db`` or ``https://user:TOKEN@tracking.example``.

The platform needs the password to connect, and nothing else may show it: every message, printed line, run file and
MLflow param that carries a storage or tracking URL goes through ``mask`` first. Prefer keeping passwords out of
recipes and command lines altogether (``PGPASSWORD`` or ``~/.pgpass`` for PostgreSQL, ``MLFLOW_TRACKING_PASSWORD`` /
``MLFLOW_TRACKING_TOKEN`` for a tracking server): then there is nothing to mask.
"""

from __future__ import annotations

import re

# scheme://user:password@ -- the password ends at the last "@" before the host (passwords may hold "@" only encoded)
_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s'\"]*):(?P<password>[^/@\s'\"]+)@")

MASK = "***"


def mask(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` URL in it replaced by ``***``."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
