"""MLflow runs of a study: one parent run per study, one nested child run per finished trial.

Runs are created with explicit ids (`MlflowClient.create_run` / `log_batch` / `set_terminated`),
never through the fluent active-run stack, so trials in threads, processes or on other machines
never fight over "the active run". Tracking is best-effort: a dead or failing server costs one
warning per tracker and a few seconds, never a trial.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dmdopt._util import (
    DEFAULT_ARTIFACTS,
    DEFAULT_TRACKING_URI,
    OPTUNA_TABLES,
    _search_path,
    connect_timeout_args,
    deferred_interrupts,
    file_in_the_way,
    git_commit,
    mask_url,
    read_only_sqlite,
    redact_password,
    same_database,
    sqlite_file,
    url_encoding_hint,
    versions,
    with_sql_driver,
)
from dmdopt.errors import UserError
from dmdopt.pareto import reference_point

log = logging.getLogger(__name__)
# MLflow announces its one-off sqlite schema set-up at INFO on every new store; in a study's
# log of one line per trial that is noise.
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)

FINISHED_STATES = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"

TAG_STUDY, TAG_ROLE = "dmdopt.study", "dmdopt.role"
TAG_TRIAL, TAG_STATE, TAG_FAIL = "dmdopt.trial_number", "dmdopt.trial_state", "dmdopt.fail_reason"
TAG_DUPLICATE = "dmdopt.duplicate_of"
TAG_RERUN = "dmdopt.rerun_of"  # the interrupted or dead trial this one re-ran
TAG_UID = "dmdopt.study_uid"  # which study of that name (see search.summary.study_uid)
TAG_LOGGED_AT = "dmdopt.logged_at_ns"  # when a child was written: the first of twins stays
_HALF_LOGGED_AFTER_S = 120  # a child RUNNING for longer was cut off while being written

_PARENT_SETTLE_S = 0.5  # after creating a parent, let a concurrent creator's insert land
_MAX_PARAMS, _MAX_TAGS, _MAX_METRICS = 100, 100, 1000  # MLflow log_batch limits per call
_PARAM_LEN, _TAG_LEN = 6000, 5000
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}

T = TypeVar("T")


def _logged_at(run) -> int:
    """When a child was created (ns); 0 for children of versions before the tag."""
    try:
        return int(run.data.tags.get(TAG_LOGGED_AT, 0))
    except ValueError:
        return 0


# ---------------------------------------------------------------- store locations

def resolve_tracking_uri(uri: str | None) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else the local sqlite default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_tracking_uri(tracking_uri: str | None, field: str = "--tracking-uri", *,
                       storage: str | None = None) -> str:
    """The resolved URI; UserError (exit 2) when it cannot work as a tracking store.

    Refused: a scheme MLflow has no store for (a typo such as `localhost:5000` ran a whole
    study untracked after one warning); the Optuna `storage`'s own database, or any database
    holding an Optuna storage (MLflow put its tables beside Optuna's, exit 0); a database
    store that does not accept a connection now (a wrong password cost minutes of MLflow's
    retries). An HTTP server that does not answer stays best-effort: it may come back, and
    `study sync-mlflow` fills in what it missed."""
    uri = resolve_tracking_uri(tracking_uri)
    where = (field if tracking_uri else "$MLFLOW_TRACKING_URI"
             if os.environ.get("MLFLOW_TRACKING_URI") else "the default tracking store")
    shown = mask_url(uri) if "://" in str(uri) else re.sub(r"^.*@", "***@", str(uri))
    if re.fullmatch(r"[\w.-]+:\d+", str(uri)):  # 127.0.0.1:5000: no scheme, read as a folder
        raise UserError(f"{where}: {shown!r} has no scheme; a tracking server is "
                        f"http://{shown}")
    try:  # the registry MLflow resolves every URI with (a lookup: no connection, no file)
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry as registry

        builder = getattr(registry.get_store_builder(uri), "__name__", "")
    except MlflowException:
        raise UserError(f"{where}: MLflow has no tracking store for {shown!r}; use e.g. "
                        "http://HOST:5000, sqlite:///PATH.db or postgresql://...") from None
    except ValueError as exc:  # urlparse: 'http://[::1:5000' is no URL
        raise UserError(f"{where}: {shown!r} is not a URI ({exc})") from None
    except (ImportError, AttributeError, TypeError):  # MLflow moved it: MLflow reports later
        builder = ""
    try:
        scheme = urlparse(str(uri)).scheme.lower()
    except ValueError as exc:
        raise UserError(f"{where}: {shown!r} is not a URI ({exc})") from None
    if builder == "_get_file_store" and _file_store_refused():
        # MLflow raises on its folder store unless opted out: it never would work
        raise UserError(f"{where}: {shown!r} is an MLflow file store, which this MLflow refuses "
                        "(unless MLFLOW_ALLOW_FILE_STORE=true); use sqlite:///PATH.db")
    path = sqlite_file(str(uri))
    if path is not None and path.is_dir():
        raise UserError(f"{where}: {shown!r} names the folder {path}, not a database file; "
                        f"use e.g. sqlite:///{path / 'mlflow.db'}")
    if path is not None and (file := file_in_the_way(path)) is not None:
        # MLflow's mkdir fails on every write: the study ran untracked, exit 0
        raise UserError(f"{where}: {shown!r} cannot be created: {file} is a file, not a folder")
    if storage and same_database(uri, storage):
        raise UserError(f"{where}: {shown!r} is the database of the Optuna storage; {_OWN_DATABASE}")
    if scheme.split("+")[0] in _SERVER_SCHEMES:
        _check_sql_driver(uri, where, shown)
        _probe_database(uri, where, shown)
    elif path is not None and _sqlite_header(path):
        _probe_database(uri, where, shown)  # (any other file is refused by prepare_local_store)
    return uri


_SERVER_SCHEMES = ("postgresql", "postgres", "mysql", "mssql", "oracle")
_PROBE_TIMEOUT_S = 10
_PROBE_GRACE_S = 5  # beyond the driver's own timeout, before the probe is given up
_OWN_DATABASE = ("MLflow and Optuna would mix their tables there (each keeps its own "
                 "alembic_version): give MLflow a database of its own, e.g. "
                 "sqlite:///dmdopt-runs/mlflow.db, or a PostgreSQL schema of its own "
                 "(...?options=-csearch_path%3Dmlflow)")


def _probe_database(uri: str, where: str, shown: str) -> None:
    """Connect once (at most 15 s) and list the tables. MLflow makes each client try 10 times
    with back-off (about 100 s, a warning each) before it gives up on a refused password or a
    database that is not there; and a database holding Optuna's tables is a storage another
    URL already names, which MLflow would write its own tables into."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    try:
        url = make_url(with_sql_driver(uri))
    except ValueError as exc:  # a port that is no number: often a password's unescaped ':/@#'
        raise UserError(f"{where}: {shown!r} is not a database URL "
                        f"({redact_password(str(exc), uri)}){url_encoding_hint(uri)}") from None
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy can't read: MLflow reports it
        return
    backend = url.get_backend_name()
    timeout = ({"timeout": _PROBE_TIMEOUT_S} if backend == "sqlite"  # sqlite3's lock wait
               else connect_timeout_args(uri, _PROBE_TIMEOUT_S))
    try:
        engine = create_engine(url, connect_args=timeout, poolclass=NullPool)
    except Exception:  # noqa: BLE001 - a driver or option SQLAlchemy refuses: MLflow reports it
        return
    listed: dict[str, Any] = {}

    def list_tables() -> None:
        try:
            listed["tables"] = set(inspect(engine).get_table_names())
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread below
            listed["error"] = exc

    # The driver's timeout bounds the connection only: not a DNS lookup, not libpq's second
    # address for localhost, not drivers without one (mssql, oracle). The thread bounds it all.
    prober = threading.Thread(target=list_tables, name="dmdopt-store-probe", daemon=True)
    prober.start()
    prober.join(_PROBE_TIMEOUT_S + _PROBE_GRACE_S)
    if prober.is_alive():  # (its connection stays open until the driver gives up)
        raise UserError(f"{where}: cannot use {shown!r} as a tracking store: no answer within "
                        f"{_PROBE_TIMEOUT_S + _PROBE_GRACE_S:g} s")
    try:
        if "error" in listed:
            raise listed["error"]
        tables = listed["tables"]
    except TypeError:  # a connect argument this driver lacks: no check, MLflow reports the rest
        return
    except Exception as exc:  # noqa: BLE001 - OperationalError & co: the reason is the line
        text = str(getattr(exc, "orig", None) or exc).strip()
        if backend == "sqlite" and "locked" in text:  # a writer at work: no reason to refuse
            return
        reason = redact_password(mask_url(text.splitlines()[0] if text else type(exc).__name__),
                                 uri)
        raise UserError(f"{where}: cannot use {shown!r} as a tracking store: {reason}"
                        f"{url_encoding_hint(uri)}") from None
    finally:
        engine.dispose()
    if OPTUNA_TABLES <= tables:
        raise UserError(f"{where}: {shown!r} holds an Optuna storage; {_OWN_DATABASE}")


def _file_store_refused() -> bool:
    """MLflow raises on a folder (file) store from 3.13 on, unless MLFLOW_ALLOW_FILE_STORE is
    set; 3.0-3.12 (pyproject allows them) still write one."""
    from importlib.metadata import version

    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
        return False
    try:
        major, minor = (int(part) for part in version("mlflow").split(".")[:2])
    except (ValueError, ImportError):
        return False  # an odd version string: MLflow itself reports later
    return (major, minor) >= (3, 13)


def _check_sql_driver(uri: str, where: str, shown: str) -> None:
    """A database store whose Python driver is not installed: MLflow's error is a warning per
    trial (ModuleNotFoundError: psycopg) while the whole study runs untracked."""
    from sqlalchemy.engine import make_url

    try:
        dialect = make_url(with_sql_driver(uri)).get_dialect()
        dialect.import_dbapi()
    except ImportError as exc:
        hint = " (dmdopt's [postgres] extra installs psycopg2)" if "postgres" in uri else ""
        raise UserError(f"{where}: {shown!r} needs the Python driver {exc.name or exc}, which is "
                        f"not installed{hint}") from None
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy can't read: MLflow reports it
        pass


def local_artifact_root(uri: str) -> Path | None:
    """Artifacts beside a sqlite store (`<db dir>/mlartifacts`); None for servers.

    A server decides its own artifact location (`mlflow-artifacts:/`); forcing a local path
    there would point every client at a folder on the wrong machine.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):]
    if db in ("", ":memory:"):
        return Path(DEFAULT_ARTIFACTS).resolve()
    return (Path(db).parent / "mlartifacts").resolve()


def fail_fast(uri: str) -> None:
    """For an HTTP tracking server: no retries and a 5 s timeout (unless the user set them), so
    a dead server costs seconds, not MLflow's default minutes of back-off."""
    if uri.startswith(("http://", "https://")):
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)


def prepare_local_store(uri: str) -> None:
    """Create the folder of a sqlite database (sqlite won't create missing directories), and
    raise PermissionError when the file or its folder cannot be written: MLflow would retry
    its writes for minutes before failing (210 s measured) instead of failing now. A file that
    is not a SQLite database is an OSError now too (the MLflow server died on it with a
    69-line traceback after `dmdopt ui` had printed its URL)."""
    path = sqlite_file(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if (where := read_only_sqlite(path)) is not None:
            raise PermissionError(f"{where} is read-only")
        if path.is_dir():  # sqlite cannot open it; MLflow retried for 3.5 min before failing
            raise IsADirectoryError(f"{path} is a folder, not a database file")
        if path.is_file() and path.stat().st_size and not _sqlite_header(path):
            raise OSError(f"{path} is not a SQLite database")


@contextmanager
def _store_setup_lock(uri: str) -> Iterator[None]:
    """Held while a process opens (creates or migrates) an MLflow database store.

    Why: MLflow creates and migrates its schema on a store's first open, with no lock of its
    own. Several `dmdopt study run` processes started at once on a fresh store (one per machine
    on one PostgreSQL, or several in one folder on the default SQLite file) ran the migration
    together: 2 of 3 failed ("duplicate column name: step", a UniqueViolation on
    alembic_version) and a SQLite store kept half-done `_alembic_tmp_*` tables. SQLite: an
    exclusive `flock` on `<db>.setup-lock` beside it. PostgreSQL: a session advisory lock.
    Other stores (a server, MySQL): no lock."""
    path = sqlite_file(uri)
    if path is not None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        with open(path.with_name(path.name + ".setup-lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    if urlparse(uri).scheme.split("+")[0] not in ("postgresql", "postgres"):
        yield
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    url = with_sql_driver(uri)
    key = _setup_lock_key(url)
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_timeout_args(url, 10),
                           isolation_level="AUTOCOMMIT")  # not "idle in transaction" meanwhile
    try:
        with engine.connect() as conn:
            # try, not wait: a holder that stalled (or whose link died: its session lives on
            # until TCP keepalive, about 2 h) must not hang every new worker without a word
            deadline = time.monotonic() + SETUP_LOCK_WAIT_S
            while not (held := bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                                                 {"k": key}).scalar())):
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
            if not held:
                log.warning("MLflow store %s: another process has held its set-up lock for %.0f s; "
                            "going on without it", mask_url(uri), SETUP_LOCK_WAIT_S)
            try:
                yield
            finally:
                if held:
                    with suppress(Exception):
                        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


SETUP_LOCK_WAIT_S = 120.0  # MLflow's whole migration takes seconds


def _setup_lock_key(url: str) -> int:
    """The advisory-lock key of one MLflow store: its database and schema (the first of the
    search_path, as `same_database` reads it), so stores in other schemas don't wait."""
    import hashlib

    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    name = (f"dmdopt-mlflow-setup:{parsed.host}:{parsed.port}:{parsed.database}:"
            f"{_search_path(parsed.query.get('options'))}")
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def open_client(uri: str) -> MlflowClient:
    """A client of the store at `uri`, its schema created or migrated by one process at a
    time (`_store_setup_lock`): the first query runs under the lock."""
    prepare_local_store(uri)
    with _store_setup_lock(uri):
        client = MlflowClient(tracking_uri=with_sql_driver(uri))
        client.search_experiments(max_results=1)
    return client


def _sqlite_header(path: Path) -> bool:
    """Whether a non-empty file starts with SQLite's header, read without opening the database
    (a lock held by a writer is no reason to refuse it)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """Experiment id by name; created (race-safe) with artifacts beside a local store.

    Tagged as model training: MLflow 3's UI otherwise opens experiments on its GenAI
    (traces) pages, where runs are not shown.
    """
    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = local_artifact_root(uri)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "study"
        try:
            return client.create_experiment(
                name, artifact_location=(root / slug).as_uri() if root else None,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # another process created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


# ---------------------------------------------------------------- small conversions
def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"}; lists as JSON; long values truncated for MLflow."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif prefix:
        text = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
        out[prefix[:250]] = text[:_PARAM_LEN]
    return out


def _epoch_ms(iso: str | None, default: int) -> int:
    if not iso:
        return default
    try:
        return int(datetime.fromisoformat(iso).timestamp() * 1000)
    except ValueError:
        return default


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, (str, dict, list)):
        return None
    try:
        num = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(num) else num


def _step(cost: Any) -> int | None:
    """A cost as an MLflow metric step (int); None when missing or infinite."""
    num = _number(cost)
    return int(round(num)) if num is not None and math.isfinite(num) else None


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def log_batch(client: MlflowClient, run_id: str, *, metrics: Sequence[Metric] = (),
               params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
    """log_batch within MLflow's per-call limits."""
    plist = [Param(k, v) for k, v in (params or {}).items()]
    tlist = [RunTag(k, str(v)[:_TAG_LEN]) for k, v in (tags or {}).items()]
    for chunk in _chunks(plist, _MAX_PARAMS):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks(tlist, _MAX_TAGS):
        client.log_batch(run_id, tags=chunk)
    for chunk in _chunks(list(metrics), _MAX_METRICS):
        client.log_batch(run_id, metrics=chunk)


def _find(config: Any, key: str) -> Any:
    """First value of `key` anywhere in a nested dict (breadth first)."""
    queue = [config]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            if key in node:
                return node[key]
            queue.extend(v for v in node.values() if isinstance(v, dict))
    return None


# ---------------------------------------------------------------- failure tolerance
PAUSE_AFTER_FAILURE_S = 60.0


def tolerant(method: Callable[..., T]) -> Callable[..., T | None]:
    """Run a tracker method; on any error warn (once) and return None, and do nothing for
    PAUSE_AFTER_FAILURE_S (the next logged trial, `dmdopt study sync-mlflow` or a resume fills
    in what is missing)."""

    @functools.wraps(method)
    def wrapper(self: StudyTracker, *args: Any, **kwargs: Any) -> T | None:
        # paused for a while after a failure: a hung server would otherwise cost every later
        # trial its timeouts (10 s each); a blip (a locked SQLite file) only pauses it
        if time.monotonic() < self._paused_until:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never fail a trial
            self._report(method.__name__, exc)
            self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
            return None

    return wrapper


def _quiet_terminate(client: MlflowClient, run_id: str, status: str, **kwargs: Any) -> None:
    """`set_terminated` without MLflow's "View run ... at" lines on stdout (two per run against
    an HTTP server: noise in a study's log of one line per trial)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        client.set_terminated(run_id, status, **kwargs)


def _loggable(trial: dict) -> bool:
    """Finished trials, except those pruned as surplus before training (not results; the
    summary flags them, see CONTRACT.md)."""
    return trial.get("state") in FINISHED_STATES and not trial.get("surplus", False)


# ---------------------------------------------------------------- the tracker
class StudyTracker:
    """Mirrors one Optuna study (as a CONTRACT.md summary) into MLflow runs."""

    def __init__(self, tracking_uri: str | None, study_name: str,
                 study_uid: str | None = None, *, warn: bool = True) -> None:
        """`warn=False`: a failure is not warned but kept in `first_failure` (one line; the
        first is the cause, later ones its effects), for a command that reports it as its own
        error (`sync-mlflow`)."""
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.first_failure: str | None = None
        self.study_name = study_name
        # runs are this study's when both name and uid match; None (a study made before uids)
        # matches runs without the tag, as before
        self.study_uid = study_uid
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent_id: str | None = None
        self._warned = not warn
        self._paused_until = -math.inf
        # children this tracker began and a failure cut off (replaced at once, not after
        # _HALF_LOGGED_AFTER_S), and trials left to another writer's young RUNNING child
        self._cut_off: set[str] = set()
        self.pending: set[int] = set()
        # True while a launcher or worker of the study runs in this process: the parent then
        # stays RUNNING between two trials, when the storage shows none running (a single
        # worker's parent was otherwise FINISHED for the whole study). The launcher clears it
        # before its last refresh; `sync-mlflow` never sets it.
        self.training = False
        fail_fast(self.tracking_uri)

    # -- plumbing
    def unpause(self) -> None:
        """End a pause after a failure now (a last sync, once the trials are done)."""
        self._paused_until = -math.inf

    def _report(self, what: str, exc: BaseException) -> None:
        # the first line only: a failed migration quotes its whole SQL statement
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        failure = redact_password(f"{what}: {type(exc).__name__}: {reason}", self.tracking_uri)
        self.first_failure = self.first_failure or failure
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"MLflow tracking at {mask_url(self.tracking_uri)} failed ({failure}); "
                "tracking pauses for "
                f"{PAUSE_AFTER_FAILURE_S:.0f} s after each failure (later errors are logged at "
                "debug level); the next trial logged after a pause, or `dmdopt study "
                "sync-mlflow`, fills in what is missing once the store works.",
                RuntimeWarning, stacklevel=3)
        log.debug("MLflow %s failed", what, exc_info=exc)

    def _uid_tag(self) -> dict[str, str]:
        return {TAG_UID: self.study_uid} if self.study_uid else {}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = open_client(self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = get_or_create_experiment(self.client, self.study_name,
                                                           self.tracking_uri)
        return self._experiment_id

    def _search(self, filter_string: str) -> list:
        """All active runs of this study's experiment matching the filter (paginated)."""
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            runs.extend(r for r in page if r.data.tags.get(TAG_STUDY) == self.study_name
                        and r.data.tags.get(TAG_UID) == self.study_uid)
            token = page.token
            if not token:
                return runs

    def _parents(self) -> list:
        runs = self._search(f"tags.`{TAG_ROLE}` = 'parent'")
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def _child_filter(self, parent_id: str | None) -> str:
        """Children of this study's parent: a child of a parent the user deleted is not one
        (sync then logs the trial again, under the parent that is left)."""
        text = f"tags.`{TAG_ROLE}` = 'child'"
        return text + (f" and tags.`mlflow.parentRunId` = '{parent_id}'" if parent_id else "")

    def logged_trials(self) -> dict[int, str]:
        """trial number -> child run id, for every child of the parent already in MLflow (and
        terminated: a child still RUNNING was cut off while being written, see `log_trial`)."""
        found: dict[int, str] = {}
        for run in self._search(self._child_filter(self._parent_id)):
            if run.info.status == "RUNNING":
                continue
            try:
                found.setdefault(int(run.data.tags[TAG_TRIAL]), run.info.run_id)
            except (KeyError, ValueError):
                continue
        return found

    # -- parent
    def _create_parent(self, summary: dict) -> str:
        config = summary.get("config") or {}
        sampler = summary.get("sampler") or _find(config, "sampler")
        if isinstance(sampler, dict):
            sampler = sampler.get("name") or sampler.get("type")
        tags = {TAG_STUDY: self.study_name, TAG_ROLE: "parent", **self._uid_tag(),
                "dmdopt.storage": mask_url(summary.get("storage")) or "",
                "dmdopt.sampler": sampler or "",
                "dmdopt.objectives": ",".join(summary.get("objectives")
                                              or summary.get("metric_names") or []),
                **{f"dmdopt.version.{k}": v for k, v in versions().items()}}
        commit = git_commit()
        if commit:
            # MLflow's own tag names a commit (its UI links it); ours also says "-dirty"
            tags.update({"dmdopt.git_commit": commit,
                         "mlflow.source.git.commit": commit.removesuffix("-dirty")})
        run = self.client.create_run(self.experiment_id, run_name=self.study_name, tags=tags)
        params = {k: mask_url(v) for k, v in flatten(config).items()}  # storage URLs in config
        log_batch(self.client, run.info.run_id, params=params)
        return run.info.run_id

    @tolerant
    def ensure_parent(self, summary: dict) -> str:
        """The study's parent run id; created when missing.

        When several exist (two machines started at once), every tracker picks the earliest
        started (ties: smallest run id); a tracker that created a losing duplicate deletes it.
        """
        parents = self._parents()
        if not parents:
            created = self._create_parent(summary)
            time.sleep(_PARENT_SETTLE_S)
            parents = self._parents()
            if parents and parents[0].info.run_id != created:
                self.client.delete_run(created)
            elif not parents:  # search lag on a remote store: our own run is the parent
                self._parent_id = created
                return created
        self._parent_id = parents[0].info.run_id
        return self._parent_id

    def _parent(self, summary: dict) -> str:
        if self._parent_id is None:
            self.ensure_parent(summary)
        if self._parent_id is None:
            raise RuntimeError("no parent run")
        return self._parent_id

    # -- children
    def _create_child(self, summary: dict, trial: dict, parent_id: str) -> str:
        number, state = trial["number"], trial["state"]
        attrs = trial.get("user_attrs") or {}
        now = int(time.time() * 1000)
        tags = {"mlflow.parentRunId": parent_id, TAG_STUDY: self.study_name, TAG_ROLE: "child",
                TAG_TRIAL: str(number), TAG_STATE: state, TAG_LOGGED_AT: str(time.time_ns()),
                **self._uid_tag()}
        if state == "FAIL" or attrs.get("fail_reason"):
            tags[TAG_FAIL] = str(attrs.get("fail_reason") or "unknown")
        if attrs.get("duplicate_of") is not None:  # same settings as an earlier trial: its result
            tags[TAG_DUPLICATE] = str(attrs["duplicate_of"])
        if attrs.get("rerun_of") is not None:
            tags[TAG_RERUN] = str(attrs["rerun_of"])
        params = flatten(trial.get("params") or {})
        params.update(flatten(attrs.get("dmd") or {}, "dmd"))
        params.update(flatten(attrs.get("training") or {}, "training"))

        final: dict[str, float] = {}
        names = summary.get("metric_names") or ["cost_bpe", "val_rel_l2"]
        for name, value in zip(names, trial.get("values") or [], strict=False):
            if (num := _number(value)) is not None:
                final[name] = num
        if (num := _number(trial.get("objective"))) is not None:  # cost_to_target's own value
            final["objective"] = num
        for key in ("cost_bpe", "cost_total", "cost_to_reference", "val_error", "test_error",
                    "speedup", "speedup_first_passage", "wall_time", "jumps_accepted", "jumps_rejected",
                    "reached_reference"):
            if key == "cost_to_reference" and attrs.get("reached_reference") is False:
                continue  # never reached: the stored figure is its whole spend, not a cost to it
            if key not in final and (num := _number(attrs.get(key))) is not None:
                final[key] = num
        curve = [(step, v) for c, e in attrs.get("curve") or []
                 if (step := _step(c)) is not None and (v := _number(e)) is not None]
        metrics = [Metric("val_error", v, now, step) for step, v in curve]
        last_step = max((s for s, _ in curve), default=0)
        if "val_error" in final and (not curve or curve[-1][1] != final["val_error"]):
            step = max(last_step, _step(final.get("cost_total")) or 0)
            metrics.append(Metric("val_error", final.pop("val_error"), now + 1, step))
        else:
            final.pop("val_error", None)  # the curve's last point is the final value
        metrics += [Metric(k, v, now + 1, 0) for k, v in final.items()]

        start = _epoch_ms(trial.get("datetime_start"), now)
        # Terminating the run is its last write: a child left RUNNING is one a failure (the
        # store gone mid-way) cut off, and the next log_trial replaces it. Ctrl-C waits.
        with deferred_interrupts():
            run = self.client.create_run(self.experiment_id, start_time=start, tags=tags,
                                         run_name=f"trial-{number:03d}")
            run_id = run.info.run_id
            try:
                log_batch(self.client, run_id, metrics=metrics, params=params)
                _quiet_terminate(self.client, run_id, FINISHED_STATES[state],
                                 end_time=_epoch_ms(trial.get("datetime_complete"), now))
            except BaseException:
                # ours, so no other writer to wait for: gone, or replaced by the next log_trial
                # at once (it waited _HALF_LOGGED_AFTER_S, past the end of a run, for a child
                # it could tell from another process's only by age)
                self._cut_off.add(run_id)
                with suppress(Exception):
                    self.client.delete_run(run_id)
                raise
        return run_id

    @tolerant
    def log_trial(self, summary: dict, number: int) -> str | None:
        """Child run of a finished trial (COMPLETE, FAIL, PRUNED); None if already logged."""
        trial = next((t for t in summary.get("trials") or [] if t["number"] == number), None)
        if trial is None or not _loggable(trial):
            return None
        parent_id = self._parent(summary)
        twin_filter = f"{self._child_filter(parent_id)} and tags.`{TAG_TRIAL}` = '{int(number)}'"
        existing = self._search(twin_filter)
        if any(run.info.status != "RUNNING" for run in existing):
            return None
        # A child left RUNNING was cut off while written (children are terminated as they are
        # written) -- or another process is writing it right now: replace it once it is older
        # than a write can take; until then, leave it to its writer.
        now_ns = time.time_ns()
        for running in existing:
            if (running.info.run_id not in self._cut_off
                    and now_ns - _logged_at(running) < _HALF_LOGGED_AFTER_S * 1e9):
                self.pending.add(number)
                return None
        self.pending.discard(number)
        for half_logged in existing:
            self.client.delete_run(half_logged.info.run_id)
        created = self._create_child(summary, trial, parent_id)
        # A resume's log_missing and a worker's callback may both have found no child and
        # both made one: the first logged (its tag; then the smaller run id) stays, RUNNING
        # twins included (one may still be finishing), and a process whose child came later
        # deletes its own.
        # (the half-logged ones just deleted are no longer active: the search leaves them out)
        twins = sorted(self._search(twin_filter), key=lambda run: (_logged_at(run), run.info.run_id))
        if twins and twins[0].info.run_id != created:
            self.client.delete_run(created)
            return None
        return created

    # -- parent artifacts and metrics
    @tolerant
    def refresh_parent(self, summary: dict) -> str:
        """Pareto HTML/PNG/CSV, dashboard, hypervolume history and status on the parent."""
        from dmdopt.tracking import dashboard, figures

        parent_id = self._parent(summary)
        client = self.client
        with tempfile.TemporaryDirectory(prefix="dmdopt-artifacts-") as tmp:
            out = Path(tmp)
            writers = {
                "pareto.html": lambda p: p.write_text(figures.pareto_html(summary), encoding="utf-8"),
                "pareto.png": lambda p: figures.write_pareto_png(summary, p),
                "pareto.csv": lambda p: p.write_text(figures.pareto_csv(summary), encoding="utf-8"),
                "dashboard.html": lambda p: dashboard.write_dashboard(summary, p),
            }
            for name, write in writers.items():  # one failing figure must not cost the others
                try:
                    write(out / name)
                except Exception as exc:  # noqa: BLE001 - a figure's failure, not the store's
                    warnings.warn(f"MLflow: {name} of study {self.study_name!r} could not be "
                                  f"written ({type(exc).__name__}: {exc}); the parent run gets "
                                  "the other artifacts", RuntimeWarning, stacklevel=2)
                    (out / name).unlink(missing_ok=True)
            client.log_artifacts(parent_id, str(out))

        now = int(time.time() * 1000)
        logged = {m.step for m in client.get_metric_history(parent_id, "hypervolume")}
        metrics = [Metric("hypervolume", float(hv), now, int(n))
                   for n, hv in summary.get("hypervolume_history") or [] if int(n) not in logged]
        existing = client.get_run(parent_id).data.metrics
        ref = summary.get("reference") or {}
        # its point as the front and pareto.csv show it (a cost_to_target study with its own
        # target: where plain training reached that target)
        point = reference_point(summary) or (ref.get("cost_bpe"), ref.get("val_rel_l2"))
        values = {"cost_bpe": point[0], "val_rel_l2": point[1],
                  "test_rel_l2": ref.get("test_rel_l2"), "wall_time": ref.get("wall_time")}
        for key, value in values.items():
            name = f"reference_{key}"
            if name not in existing and (num := _number(value)) is not None:
                metrics.append(Metric(name, num, now, 0))
        rec = summary.get("recommended") or {}
        tags = {"dmdopt.pareto": ",".join(str(n) for n in summary.get("pareto") or []),
                "dmdopt.recommended_trial": str(rec.get("number", "")),
                "dmdopt.recommended_policy": str(rec.get("policy", ""))}
        log_batch(client, parent_id, metrics=metrics, tags=tags)
        states = {t.get("state") for t in summary.get("trials") or []}
        # RUNNING while this process trains the study or some trial trains anywhere; a queued
        # (WAITING) trial alone -- an interrupted trial's rerun, a killed worker's retry --
        # waits for a resume that may never come
        if self.training or "RUNNING" in states:
            client.update_run(parent_id, status="RUNNING")
        else:
            _quiet_terminate(client, parent_id, "FINISHED")
        return parent_id

    @tolerant
    def log_missing(self, summary: dict) -> int:
        """Log every finished trial MLflow lacks (trials ended by Ctrl-C or SIGTERM, whose
        callback never ran; a gap while the server was down); returns children added, or
        None at the first error (reported once: a server gone mid-way would otherwise cost
        every remaining trial its own retry cycle, and a sync would claim success)."""
        self._parent(summary)
        have = self.logged_trials()
        added = 0
        log_trial = StudyTracker.log_trial.__wrapped__  # errors stop the loop, not one trial
        for trial in summary.get("trials") or []:
            # log_trial searches for the trial's run again right before creating it: other
            # launchers resuming at the same moment, or a worker's callback, may have logged it
            if (_loggable(trial) and trial["number"] not in have
                    and log_trial(self, summary, trial["number"]) is not None):
                added += 1
        return added

    @tolerant
    def sync(self, summary: dict) -> int:
        """`log_missing`, then refresh the parent; returns children added."""
        added = self.log_missing(summary)
        if added is None:  # the server is unreachable (already reported)
            return None
        if self.refresh_parent(summary) is None:  # reported: not "synced"
            return None
        return added
