"""Small helpers shared by several modules (versions, git commit, URL masking)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]+:)(?P<pw>[^@\s]*)(?P<at>@)")


def mask_url(url: str | None) -> str | None:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`."""
    if url is None:
        return None
    return _PASSWORD_IN_URL.sub(lambda m: f"{m['head']}***{m['at']}", str(url))


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the git checkout holding `path` (default: this package), if any."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def versions() -> dict[str, str]:
    """dmdopt, torch, optuna, mlflow versions (those importable)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("dmdopt", "torch", "optuna", "mlflow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
