"""Start the MLflow UI (`mlflow server`) on the study store, loopback-only unless asked.

The MLflow server has no authentication, so binding beyond loopback is an explicit opt-in.
The server runs in its own session (process group) so `stop_ui` can end it together with the
uvicorn process it spawns.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from dmdopt._util import mask_url, redact_password, sqlite_file, with_sql_driver
from dmdopt.errors import UserError
from dmdopt.tracking.runs import (
    DEFAULT_ARTIFACTS,
    check_tracking_uri,
    local_artifact_root,
    open_client,
)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def ui_url(host: str, port: int) -> str:
    """Browsable URL; wildcard binds are shown as localhost."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def server_command(*, host: str, port: int, backend_store_uri: str, artifacts: str) -> list[str]:
    """`python -m mlflow server` serving (proxying) artifacts so the UI can show them."""
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", with_sql_driver(backend_store_uri),
            "--serve-artifacts", "--artifacts-destination", artifacts,
            "--host", host, "--port", str(port), "--workers", "1"]


def _check_can_listen(host: str, port: int) -> None:
    """Bind (host, port) once ourselves: the MLflow server, failing to, logs the error and
    exits 0, so `dmdopt ui` would report success for a UI that never started."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"ui.host: cannot resolve {host!r}: {exc.strerror}") from None
    failure: OSError | None = None
    for family, kind, proto, _, address in infos:  # e.g. localhost: ::1 and 127.0.0.1
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                sock.bind(address)
                return
            except OSError as exc:
                failure = failure if failure and failure.errno == errno.EADDRINUSE else exc
    raise UserError(f"ui.port: cannot listen on {host}:{port}: {failure.strerror}"
                    + ("; pick another --port" if failure.errno == errno.EADDRINUSE else ""))


def start_ui(*, host: str = "127.0.0.1", port: int = 5000, backend_store_uri: str | None = None,
             artifacts: str | Path | None = None, allow_remote: bool = False,
             log_file: str | Path | None = None) -> subprocess.Popen:
    """Start the MLflow UI on the study store and print its URL; returns the server process.

    `log_file` sends the server's output there instead of this terminal.
    """
    if not is_loopback(host) and not allow_remote:
        raise UserError(f"ui.host: {host!r} is not a loopback address and the MLflow UI has no "
                        "authentication; pass --allow-remote to expose it anyway")
    if not 0 < int(port) < 65536:
        raise UserError(f"ui.port: must be in 1..65535, got {port!r}")
    _check_can_listen(host, int(port))
    uri = check_tracking_uri(backend_store_uri, "ui.backend_store_uri")
    where = ("ui.backend_store_uri" if backend_store_uri else "$MLFLOW_TRACKING_URI"
             if os.environ.get("MLFLOW_TRACKING_URI") else "the default tracking store")
    if uri.startswith(("http://", "https://")):
        raise UserError(f"{where}: {mask_url(uri)!r} is already a tracking server; "
                        "open it in a browser instead")
    if (path := sqlite_file(uri)) is not None and not path.exists():
        # `dmdopt ui` in another folder than the study's served an empty store, unsaid
        print(f"note: no MLflow store at {path} yet: the UI starts on an empty one (run "
              "`dmdopt ui` in the folder the study ran in, or set MLFLOW_TRACKING_URI)",
              file=sys.stderr)
    try:
        # MLflow migrates a fresh store on its first open: here, under dmdopt's set-up lock
        # (`open_client`), not unlocked in the server beside a study's workers
        open_client(uri)
    except OSError as exc:
        raise UserError(f"{where}: cannot use {uri}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - MLflow's and the driver's errors: one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where}: cannot use {mask_url(uri)}: "
                        f"{redact_password(reason, uri)}") from None
    dest = Path(artifacts) if artifacts else (local_artifact_root(uri) or Path(DEFAULT_ARTIFACTS))
    if "://" not in str(dest):
        dest.mkdir(parents=True, exist_ok=True)
        dest = dest.resolve()
    if not is_loopback(host):
        print(f"warning: the MLflow UI on {host}:{port} is reachable from other machines and has "
              "no authentication; MLflow only accepts Host headers of localhost/private IPs "
              "unless MLFLOW_SERVER_ALLOWED_HOSTS names the others", file=sys.stderr)
    out: IO | None = None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        # No MLflow 3 job-runner processes: the UI needs none, and they outlive a killed server.
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        proc = subprocess.Popen(
            server_command(host=host, port=int(port), backend_store_uri=uri, artifacts=str(dest)),
            stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True,
            env=env)
    finally:
        if out is not None:
            out.close()
    print(f"MLflow UI: {ui_url(host, int(port))}  (store {uri}, artifacts {dest})")
    # MLflow 3 opens on its GenAI pages; the runs live under the "Model training" toggle
    print("  study runs: pick 'Model training' at the top left, then the study's experiment")
    return proc


def wait_until_up(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> bool:
    """Poll `<url>/health` until it answers 200; False on timeout or if `proc` exited."""
    deadline = time.monotonic() + timeout
    health = url.rstrip("/") + "/health"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(health, timeout=2) as resp:  # noqa: S310 - loopback
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    return False


def stop_ui(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """End the server and its workers (its whole process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
