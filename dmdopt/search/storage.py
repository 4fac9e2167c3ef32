"""Optuna storages: the default SQLite file, or any RDB URL (PostgreSQL for many machines).

Heartbeats are on for every RDB storage so that a trial whose worker died (SIGKILL, lost node)
is marked failed after `grace_period` and re-queued (at most MAX_RETRY times) by
`RetryHeartbeatStaleTrialCallback`.
"""

from __future__ import annotations

import os
import random
import time

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from dmdopt._util import (
    DEFAULT_STORAGE,
    DEFAULT_TRACKING_URI,
    MLFLOW_TABLES,
    OPTUNA_TABLES,
    connect_timeout_args,
    in_memory_sqlite,
    mask_url,
    os_reason,
    read_only_sqlite,
    redact_password,
    same_database,
    sqlite_file,
    url_encoding_hint,
    with_sql_driver,
)
from dmdopt.errors import UserError

HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 30  # seconds without a heartbeat before a trial counts as dead
MAX_RETRY = 2
# Environment overrides (tests, clusters with slow networks): whole seconds.
ENV_HEARTBEAT_INTERVAL, ENV_GRACE_PERIOD = "DMDOPT_HEARTBEAT_INTERVAL", "DMDOPT_GRACE_PERIOD"


def _env_seconds(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{name} must be a positive whole number of seconds, got {text!r}")
    return value


def heartbeat_settings(heartbeat_interval: int | None = None,
                       grace_period: int | None = None) -> tuple[int, int]:
    """(interval, grace): explicit values, else $DMDOPT_HEARTBEAT_INTERVAL / $DMDOPT_GRACE_PERIOD,
    else the defaults. The grace period must exceed the interval (or live trials look dead)."""
    interval = heartbeat_interval or _env_seconds(ENV_HEARTBEAT_INTERVAL, HEARTBEAT_INTERVAL)
    grace = grace_period or _env_seconds(ENV_GRACE_PERIOD, GRACE_PERIOD)
    if grace <= interval:
        raise UserError(f"storage: grace period ({grace} s, ${ENV_GRACE_PERIOD}) must exceed the "
                        f"heartbeat interval ({interval} s, ${ENV_HEARTBEAT_INTERVAL})")
    return interval, grace


def open_storage(url: str, *, heartbeat_interval: int | None = None,
                 grace_period: int | None = None, writable: bool = True) -> RDBStorage:
    """An RDB storage for `url`; failures are one clear line.

    SQLite directories are created. With `writable` (running a study), a file the command
    cannot write is refused up front: Optuna raised a 60-line StorageInternalError at its
    first commit."""
    heartbeat_interval, grace_period = heartbeat_settings(heartbeat_interval, grace_period)
    if in_memory_sqlite(url):
        # each process (each --workers process) would get its own empty database, and every
        # trial would be gone when the command ends
        raise UserError(f"storage: {url!r} is an in-memory database, which does not outlive the "
                        "command; use a file (sqlite:///path/optuna.db) or a server")
    path = sqlite_file(url)
    if path is not None:  # a file (in-memory databases are refused above)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"storage: cannot create {path}: {os_reason(exc, path)}") from None
        if writable and (where := read_only_sqlite(path)) is not None:
            raise UserError(f"storage: {where} is read-only; dmdopt writes to its "
                            "storage (trials, heartbeats)")
    elif "://" not in url:
        raise UserError(f"storage: not a database URL: {mask_url(url)!r} (e.g. sqlite:///file.db)")
    elif url.lower().startswith(("http://", "https://")):  # SQLAlchemy: "Can't load plugin"
        raise UserError(f"storage: {mask_url(url)!r} is an HTTP URL, such as an MLflow tracking "
                        "server's (that is --tracking-uri); the Optuna storage is a database URL, "
                        "e.g. sqlite:///dmdopt-runs/optuna.db or postgresql://USER:PASSWORD@HOST/DB")
    engine_kwargs = {"pool_pre_ping": True}
    if path is None:  # a server: a connection attempt fails within 10 s, not the OS's minutes
        engine_kwargs["connect_args"] = connect_timeout_args(url, 10)
    else:
        # --workers processes share the file: a writer waits for another's lock up to this
        # long (sqlite3's default, 5 s, let a slow commit escape as "database is locked",
        # which a worker would report as the storage lost)
        engine_kwargs["connect_args"] = {"timeout": 60}
    if path is None or path.exists():
        _check_tables(url, engine_kwargs["connect_args"], writable=writable)
    elif writable:  # a new file
        _refuse_mlflows_default(url)
    for attempt in range(_SCHEMA_RACE_ATTEMPTS):
        try:
            return RDBStorage(
                with_sql_driver(url), engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
        except Exception as exc:  # sqlalchemy OperationalError & co: unreachable / bad credentials
            if _schema_race(exc) and attempt + 1 < _SCHEMA_RACE_ATTEMPTS:
                # Workers started together on an empty database all create Optuna's tables;
                # the losers hit duplicate-key errors. The winner's schema is there next time.
                time.sleep(0.2 * 2**attempt + random.uniform(0, 0.3))
                continue
            raise _cannot_open(url, exc) from None
    raise AssertionError("unreachable")


def _cannot_open(url: str, exc: Exception) -> UserError:
    """One line for a storage that cannot be opened: its driver missing, or the server's reason."""
    if isinstance(exc, ImportError):
        hint = " (pip install 'dmdopt[postgres]')" if url.startswith("postgres") else ""
        return UserError(f"storage: driver missing for {mask_url(url)!r}{hint}: {exc}")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"storage: cannot open {mask_url(url)!r}: {redact_password(reason, url)}"
                     f"{url_encoding_hint(url)}")


def _refuse_mlflows_default(url: str) -> None:
    """A new Optuna storage in MLflow's default store (a study run with --no-mlflow) would
    hold Optuna's tables when MLflow later opens its default store there, and every tracked
    command would then be refused."""
    if same_database(url, DEFAULT_TRACKING_URI):
        raise UserError(f"storage: {mask_url(url)!r} is MLflow's default store; the Optuna "
                        f"storage needs a database of its own, e.g. {DEFAULT_STORAGE}")


def _check_tables(url: str, connect_args: dict, *, writable: bool) -> None:
    """Optuna creates its tables in whatever database it opens. A command that only reads
    (status, pareto, export) must find them there: a mistyped --storage naming MLflow's
    database, or any other, got Optuna's 13 tables (and MLflow's alembic_version read as
    Optuna's: 'please update optuna'), after which MLflow's store was refused as holding an
    Optuna storage. MLflow's own database is refused as a storage in any case."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.pool import NullPool

    try:
        engine = create_engine(with_sql_driver(url), connect_args=connect_args, poolclass=NullPool)
        try:
            tables = set(inspect(engine).get_table_names())
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - the reason is the line
        raise _cannot_open(url, exc) from None
    if OPTUNA_TABLES <= tables:
        return
    if writable:
        _refuse_mlflows_default(url)
    if MLFLOW_TABLES <= tables:
        raise UserError(f"storage: {mask_url(url)!r} is an MLflow tracking store, not an Optuna "
                        "storage (that is --tracking-uri); the Optuna storage needs a database of "
                        "its own, e.g. sqlite:///dmdopt-runs/optuna.db")
    if not writable:
        what = "its tables are another program's" if tables else "no tables"
        raise UserError(f"storage: {mask_url(url)!r} holds no Optuna storage ({what}); "
                        "status, pareto and export only read a storage that `dmdopt study run` "
                        "wrote")


_SCHEMA_RACE_ATTEMPTS = 6


def _schema_race(exc: Exception) -> bool:
    """A concurrent schema creation (another worker won), not a connection/credential error."""
    from sqlalchemy import exc as sa_exc

    text = str(exc).lower()
    # Not any ProgrammingError: a search_path naming no schema (InvalidSchemaName) or a
    # missing privilege is one too, and was retried 6 times (10 s) before its one line.
    return isinstance(exc, sa_exc.IntegrityError) or any(
        marker in text for marker in ("already exists", "duplicate key", "deadlock"))


def made_by_another_tool(study: optuna.Study) -> bool:
    """A study with trials but no dmdopt configuration: another tool's, in a shared storage.
    Its values are not (cost, error) and its trials have none of dmdopt's attributes. (One
    without trials shows nothing wrong: it may be a dmdopt study just created.)"""
    attrs = study.user_attrs
    return ("config_digest" not in attrs and "config" not in attrs
            and bool(study.get_trials(deepcopy=False)))


def load_study(name: str, url: str) -> optuna.Study:
    """An existing study, or a UserError listing the ones that exist. A missing SQLite file
    is not created (status, pareto and export only read)."""
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        why = "is a folder, not a database file" if path.is_dir() else "does not exist"
        raise UserError(f"study {name!r} not found: {path} {why}")
    storage = open_storage(url, writable=False)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        known = ", ".join(names) if names else "none"
        raise UserError(f"study {name!r} not found in {mask_url(url)} (studies there: {known})") from None
    if made_by_another_tool(study):  # a front or export of it would be nonsense
        raise UserError(f"study {name!r} in {mask_url(url)} was not made by dmdopt (it has no "
                        "dmdopt configuration); dmdopt reads only the studies it runs")
    return study
