"""Small helpers shared by several modules (the embedded default locations, versions, git
commit, URL masking, atomic files)."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

# The embedded defaults (README, "Defaults"): every store lives under ./dmdopt-runs/,
# relative to where a command runs. One place, so the CLI and the library cannot disagree.
DEFAULT_STORAGE = "sqlite:///dmdopt-runs/optuna.db"  # the Optuna storage
DEFAULT_CACHE = "dmdopt-runs/data"  # the dataset cache (solved PDE fields)
DEFAULT_TRACKING_URI = "sqlite:///dmdopt-runs/mlflow.db"  # the MLflow store
DEFAULT_ARTIFACTS = "dmdopt-runs/mlartifacts"  # its artifacts, beside it
DEFAULT_CHECKPOINTS = "dmdopt-runs/checkpoints"  # production training's checkpoints

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import (single-threaded): os.umask can only be read by setting it

# the password runs to the URL's last "@" (one typed with a raw "@" is masked whole)
_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]+:)(?P<pw>\S*)(?P<at>@)(?=[^@\s]*(?:\s|$))")


def mask_url(url: str | None) -> str | None:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`."""
    if url is None:
        return None
    return _PASSWORD_IN_URL.sub(lambda m: f"{m['head']}***{m['at']}", str(url))


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the git checkout holding `path` (default: this package), if any, with
    "-dirty" appended when tracked files under `path` differ from it (the figures then came
    from code no commit holds). None when the checkout tracks nothing under `path`: a package
    installed into a project's (ignored) `.venv` sits inside that project's repository, whose
    commit holds no dmdopt."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=5, check=False)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return None
        tracked = subprocess.run(["git", "ls-files", "--", "."], cwd=where, capture_output=True,
                                 text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if tracked.returncode != 0 or not tracked.stdout.strip():
        return None
    try:  # --no-optional-locks: never take the index lock of a checkout someone works in
        changed = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain",
                                  "--untracked-files=no", "--", "."], cwd=where,
                                 capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return commit
    return commit + ("-dirty" if changed.returncode == 0 and changed.stdout.strip() else "")


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


@contextmanager
def atomic_file(final: str | Path, mode: str = "w") -> Iterator[IO]:
    """Write `final` through a temporary file next to it, moved into place only on success.

    Readers never see half a file and a failed write leaves the old one. The file gets the
    permissions a plain `open` would (0o666 minus the umask): `mkstemp` makes it owner-only,
    which would hide an exported config or a dataset cache from the next user or job.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def out_of_memory(exc: BaseException) -> bool:
    """torch's CPU allocator raises a RuntimeError, CUDA's an OutOfMemoryError (a subclass);
    a size past int64 ("Storage size calculation overflowed") is larger than any memory."""
    text = str(exc)
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text.lower()
            or "Storage size calculation overflowed" in text)


def file_in_the_way(path: str | Path, *, folder: bool = False) -> Path | None:
    """The nearest existing folder of `path` (`path` itself too when it names a folder) when
    it is a file instead, so that `path` can never be made; else None."""
    path = Path(path)
    for parent in ((path,) if folder else ()) + tuple(path.parents):
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def os_reason(exc: OSError, path: str | Path, *, folder: bool = False) -> str:
    """Why an OSError on `path` (a folder to make, with `folder`) happened, in words a user can
    act on. Creating a folder under, or as, a file says "File exists" (or "Not a directory"),
    which reads as "the output exists": name the file in the way instead."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and (file := file_in_the_way(path, folder=folder)):
        return f"{file} is a file, not a folder"
    return exc.strerror or str(exc)


def unwritable(path: str | Path) -> str | None:
    """Why `path` cannot be written by `atomic_file` (None if it can), checked before long
    work so that a bad output path fails first, not after the work it was meant to keep.
    Creates the missing parent folders, as `atomic_file` would, and a probe file it removes."""
    named_as_folder = str(path).endswith(("/", os.sep))  # Path() drops the trailing slash
    path = Path(path)
    if named_as_folder or path.is_dir():
        return "it is a directory"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return os_reason(exc, path)
    return None


def in_memory_sqlite(url: str) -> bool:
    """sqlite://, sqlite:///, sqlite+pysqlite:///:memory:, ...?mode=memory: no file behind it."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return False  # not a URL: the caller says so
    if parsed.get_backend_name() != "sqlite":
        return False
    database = parsed.database or ""
    return (database in ("", ":memory:") or database.startswith("file::memory:")
            or parsed.query.get("mode") == "memory")


def with_sql_driver(url: str) -> str:
    """`postgresql://` names SQLAlchemy's default driver, which is psycopg 3 since SQLAlchemy 2.1;
    dmdopt's `postgres` extra installs psycopg2. Use whichever of the two is installed (for the
    Optuna storage and an MLflow store alike)."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
            return f"postgresql+psycopg2://{rest}"
        return f"postgresql://{rest}"
    return url


_CONNECT_TIMEOUT_ARG = {"psycopg2": "connect_timeout", "psycopg": "connect_timeout",
                        "pymysql": "connect_timeout", "mysqldb": "connect_timeout",
                        "pg8000": "timeout"}


def connect_timeout_args(url: str, seconds: int) -> dict:
    """The `connect_args` that bound one connection attempt to a database server at `seconds`,
    in the keyword its driver knows (pg8000 refuses libpq's `connect_timeout`); {} for a
    driver dmdopt knows no such keyword of, or a URL SQLAlchemy cannot read."""
    from sqlalchemy.engine import make_url

    try:
        driver = make_url(with_sql_driver(url)).get_driver_name()
    except Exception:  # noqa: BLE001 - not a URL, or a dialect not installed: the caller reports
        return {}
    keyword = _CONNECT_TIMEOUT_ARG.get(driver)
    return {keyword: seconds} if keyword else {}


def _userinfo(url: str) -> str:
    """`user:password` as written in the URL, '' when there is none. It ends at the first `@`
    followed by a host (no `@` before the next `/`, `?`, `#` or the end), so a password's
    unescaped `@` stays in it and an `@` in the query string (`?application_name=me@laptop`)
    does not; a user name holds none of `/?#`, so `host/db?x=a@b` has none, and digits after
    the first `:` are a port when a `?` or `#` comes before the `@` (`host:5432/db?x=me@laptop`:
    none), so a password such as `12/34` stays one and gets its hint."""
    _scheme, sep, rest = str(url).partition("://")
    if not sep:
        return ""
    for at in re.finditer("@", rest):
        userinfo = rest[:at.start()]
        if re.match(r"[^@/?#]*(?:[/?#]|$)", rest[at.end():]):
            if re.match(r"[^:/?#]*:\d*(?:/[^?#]*)?[?#]", userinfo):  # host:5432/db?x=me@laptop: a port
                return ""
            return userinfo if re.match(r"[^:/?#]*(?::|$)", userinfo) else ""
    return ""


def url_encoding_hint(url: str) -> str:
    """A hint for a failed connection whose URL looks like it holds an unescaped password
    (`p@ss` connects to the host `ss@db`, `a:b` is no port): '' when it does not."""
    userinfo = _userinfo(url)
    if any(c in userinfo for c in "@/#?") or userinfo.count(":") > 1 \
            or re.search(r"%(?![0-9A-Fa-f]{2})", userinfo):
        return ("; a password holding any of @ : / # ? % must be percent-encoded in the URL, "
                "e.g. urllib.parse.quote(password, safe='')")
    return ""


def redact_password(text: str, url: str) -> str:
    """`text` (a driver's error) without the pieces of `url`'s password: an unescaped `@` in
    it puts the rest of the password in the host name the driver then quotes."""
    password = _userinfo(url).partition(":")[2]
    pieces = {password, *re.split(r"[@:/#?]", password)}
    for piece in sorted((p for p in pieces if len(p) >= 2), key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(piece)}(?![A-Za-z0-9])", "***", text)
    return text


OPTUNA_TABLES = {"studies", "trials", "version_info"}  # what makes a database an Optuna storage
MLFLOW_TABLES = {"experiments", "runs", "metrics"}  # ... and an MLflow tracking store

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433, "oracle": 1521}
_LOOPBACK = {"", "localhost", "127.0.0.1", "::1", "[::1]"}


def _search_path(options: str | tuple | None) -> str:
    """The schema a PostgreSQL URL's tables are made in: the first of the search path its
    `options=-c search_path=...` sets, else public. Two schemas are two sets of tables."""
    text = " ".join(options) if isinstance(options, tuple) else options or ""
    found = re.search(r"-c\s*search_path\s*=\s*(\S+)", text)
    first = found[1].replace('"', "").split(",")[0].strip().lower() if found else ""
    return first or "public"  # (PostgreSQL's default: "$user", public)


def same_database(url_a: str, url_b: str) -> bool:
    """Whether two SQLAlchemy URLs name one set of tables (user, password, driver and other
    options aside): the Optuna storage and an MLflow store must not share one, because both
    keep an `alembic_version` table of their own schema there. A PostgreSQL database is one
    set per search path (`?options=-csearch_path%3Dmlflow`: MLflow's tables in the schema
    `mlflow`). URLs that cannot be read are apart."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    def where(url: str):
        parsed = make_url(with_sql_driver(url))
        backend = parsed.get_backend_name()
        if backend == "sqlite":
            path = sqlite_file(url)
            return (backend, None if path is None else str(path.resolve()))
        host = str(parsed.query.get("host") or parsed.host or "").lower()  # ?host=/socket/dir
        host = "localhost" if host in _LOOPBACK or host.startswith("/") else host
        return (backend, host, parsed.port or _DEFAULT_PORTS.get(backend), parsed.database,
                _search_path(parsed.query.get("options")))

    try:
        a, b = where(url_a), where(url_b)
    except (ArgumentError, ValueError):
        return False
    return a == b and None not in a


def sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite URL (Optuna's or MLflow's; its query string left out),
    else None (another backend, an in-memory database, not a URL)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite" or in_memory_sqlite(url):
        return None
    database = parsed.database or ""
    return Path(database[len("file:"):] if database.startswith("file:") else database)


def read_only_sqlite(path: Path) -> Path | None:
    """The existing SQLite file, or its folder, that cannot be written (SQLite writes a
    journal beside the file), else None. Checked up front: Optuna's first commit raised a
    60-line traceback, MLflow retried its writes for minutes."""
    for where in (path, path.parent):
        if where.exists() and not os.access(where, os.W_OK):
            return where
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler's stop, a preempted machine), handled like Ctrl-C:
    the running trial is marked FAIL, finished ones are kept. A subclass so that a process
    which was sent SIGTERM alone knows to pass it on to the workers it started, which a
    terminal's Ctrl-C reaches by itself."""


_TERM: dict = {"deferred": False, "pending": None}
"""Interrupt state of the main thread. Inside a `deferred_interrupts` block a SIGTERM or a
first Ctrl-C is only noted (`pending`: the exception to raise) and raised when the block ends."""


def _raise_terminated(signum, frame):
    # One-shot: `timeout`, `kill -TERM -PGID` and Slurm signal the workers directly *and* the
    # launcher passes SIGTERM on; a second `Terminated` landing inside Optuna's FAIL bookkeeping
    # left the trial RUNNING behind a long traceback.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _TERM["deferred"]:
        _TERM["pending"] = _TERM["pending"] or Terminated
        return
    raise Terminated


def _defer_sigint(signum, frame):
    if _TERM["pending"] is not None:  # a second Ctrl-C while the first waits: the user insists
        _TERM["pending"] = None
        raise KeyboardInterrupt
    _TERM["pending"] = KeyboardInterrupt


def _raise_pending() -> None:
    exc, _TERM["pending"] = _TERM["pending"], None
    if exc is not None:
        raise exc


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (main thread only); the caller's own
    handler is restored after it (a notebook or a test calling `dmdopt.cli.main`)."""
    if not _main_thread():
        yield
        return
    _TERM["pending"] = None
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        # getsignal/signal give None for a handler installed from C: restore the default then
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        _TERM["pending"] = None


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """SIGTERM and a first Ctrl-C inside the block are raised only when it ends (a second
    Ctrl-C at once). Wraps Optuna's trial bookkeeping and the tracking callback: an interrupt
    raised while Optuna records a result leaves the trial RUNNING behind an UnboundLocalError
    from Optuna's own `finally`, and one inside the MLflow callback leaves a half-logged run.
    The objective itself runs inside `interruptible`, where it is stopped at once.

    Main thread only (signals are handled nowhere else); a block inside another one does
    nothing. Ctrl-C is deferred only where Python's own SIGINT handler is in place: a caller's
    handler (or SIG_IGN) is left alone."""
    if not _main_thread() or _TERM["deferred"]:
        yield
        return
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    try:  # state changes inside the try: a signal between two statements still reaches finally
        _TERM["deferred"] = True
        if ours:
            signal.signal(signal.SIGINT, _defer_sigint)
        yield
    except KeyboardInterrupt:  # an interrupt is leaving the block: the noted one goes with it
        _TERM["pending"] = None
        raise
    except Exception as exc:  # an error is leaving it: the interrupt the user asked for wins
        pending, _TERM["pending"] = _TERM["pending"], None
        if pending is not None:
            raise pending from exc
        raise
    finally:
        try:
            if ours:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        finally:
            _TERM["deferred"] = False
    _raise_pending()


@contextmanager
def interruptible() -> Iterator[None]:
    """Undo an enclosing `deferred_interrupts` for this block (the training inside a trial): an
    interrupt noted before it, or arriving within it, raises here."""
    if not _main_thread() or not _TERM["deferred"]:
        yield
        return
    ours = signal.getsignal(signal.SIGINT) is _defer_sigint
    try:
        _TERM["deferred"] = False
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        _raise_pending()
        yield
    finally:
        try:
            if ours:
                signal.signal(signal.SIGINT, _defer_sigint)
        finally:
            _TERM["deferred"] = True
