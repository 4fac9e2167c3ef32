"""Optuna storages: the default SQLite file, or any RDB URL (PostgreSQL for many machines).

Heartbeats are on for every RDB storage so that a trial whose worker died (SIGKILL, lost node)
is marked failed after `grace_period` and re-queued once by `RetryHeartbeatStaleTrialCallback`.
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from dmdopt._util import mask_url
from dmdopt.errors import UserError

HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 30  # seconds without a heartbeat before a trial counts as dead
MAX_RETRY = 2


def open_storage(url: str, *, heartbeat_interval: int = HEARTBEAT_INTERVAL,
                 grace_period: int = GRACE_PERIOD) -> RDBStorage:
    """An RDB storage for `url`; SQLite directories are created; failures are one clear line."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if str(path) not in ("", ":memory:"):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"storage: cannot create {path.parent}: {exc.strerror}") from None
    elif "://" not in url:
        raise UserError(f"storage: not a database URL: {mask_url(url)!r} (e.g. sqlite:///file.db)")
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        return RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        )
    except ImportError as exc:
        raise UserError(f"storage: driver missing for {mask_url(url)!r}: {exc}") from None
    except Exception as exc:  # sqlalchemy OperationalError & co: unreachable / bad credentials
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"storage: cannot open {mask_url(url)!r}: {reason}") from None


def load_study(name: str, url: str) -> optuna.Study:
    """An existing study, or a UserError listing the ones that exist."""
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        known = ", ".join(names) if names else "none"
        raise UserError(f"study {name!r} not found in {mask_url(url)} (studies there: {known})") from None
