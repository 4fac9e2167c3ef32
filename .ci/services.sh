#!/usr/bin/env bash
# Start the services the multi-machine tests need, on loopback only:
#   - PostgreSQL (Debian's packages; a role + database `dmdopt` with a password)
#   - an MLflow tracking server (sqlite backend in a state dir, --serve-artifacts)
# and write `export ...` lines for them to the file given as $1:
#   DMDOPT_TEST_POSTGRES_URL=postgresql://dmdopt:<password>@127.0.0.1:<port>/dmdopt
#   DMDOPT_TEST_MLFLOW_URI=http://127.0.0.1:<port>
#
# Usage (as root, on Debian 12):  .ci/services.sh /tmp/services.env && source /tmp/services.env
# Idempotent: re-running while the services are up reuses them (same URLs).
#
# Knobs (environment):
#   DMDOPT_SERVICES_DIR   state dir: mlflow db/artifacts/log/pid   (default /tmp/dmdopt-services)
#   DMDOPT_PG_PASSWORD    password of the `dmdopt` role             (default dmdopt-ci)
#   DMDOPT_MLFLOW_PORT    first port tried for mlflow               (default 5055)
#   MLFLOW                the mlflow executable  (default: `mlflow` on PATH: the activated venv)
set -euo pipefail

ENV_FILE="${1:?usage: $0 ENV_FILE}"
STATE="${DMDOPT_SERVICES_DIR:-/tmp/dmdopt-services}"
PG_PASSWORD="${DMDOPT_PG_PASSWORD:-dmdopt-ci}"
MLFLOW_PORT0="${DMDOPT_MLFLOW_PORT:-5055}"
mkdir -p "$STATE"

say() { echo "services: $*" >&2; }
die() { echo "services: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs and starts PostgreSQL)"

# ------------------------------------------------------------------ PostgreSQL
if ! command -v pg_lsclusters >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    say "installing postgresql (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
fi

PG_VERSION="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
# A Docker-style install (no init system, policy-rc.d) may leave no cluster behind.
if ! pg_lsclusters -h | awk -v v="$PG_VERSION" '$1 == v && $2 == "main" {found=1} END {exit !found}'; then
    say "creating cluster $PG_VERSION/main"
    pg_createcluster "$PG_VERSION" main >/dev/null
fi
PG_PORT="$(pg_lsclusters -h | awk -v v="$PG_VERSION" '$1 == v && $2 == "main" {print $3}')"
PG_STATUS="$(pg_lsclusters -h | awk -v v="$PG_VERSION" '$1 == v && $2 == "main" {print $4}')"
if [ "$PG_STATUS" != "online" ]; then
    say "starting PostgreSQL $PG_VERSION/main on 127.0.0.1:$PG_PORT"
    # pg_ctlcluster, run as root, drops to the cluster owner (postgres). No init system needed.
    # listen_addresses stays Debian's default ('localhost'): loopback only.
    pg_ctlcluster "$PG_VERSION" main start
fi
for _ in $(seq 1 60); do
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break
    sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$PG_PORT" || die "PostgreSQL does not answer on 127.0.0.1:$PG_PORT"

psql_admin() { runuser -u postgres -- psql -p "$PG_PORT" -v ON_ERROR_STOP=1 -qtAX "$@"; }
SQL_PW="${PG_PASSWORD//\'/\'\'}"
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = 'dmdopt'")" != "1" ]; then
    psql_admin -c "CREATE ROLE dmdopt LOGIN PASSWORD '$SQL_PW'"
else  # keep the password in step with this run's DMDOPT_PG_PASSWORD
    psql_admin -c "ALTER ROLE dmdopt LOGIN PASSWORD '$SQL_PW'"
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = 'dmdopt'")" != "1" ]; then
    psql_admin -c "CREATE DATABASE dmdopt OWNER dmdopt"
fi
# The real check: a password login over TCP, as a worker will do it.
PGPASSWORD="$PG_PASSWORD" psql -h 127.0.0.1 -p "$PG_PORT" -U dmdopt -d dmdopt -qtAX -c "SELECT 1" >/dev/null \
    || die "cannot log in as dmdopt@127.0.0.1:$PG_PORT with the password (check pg_hba.conf)"
urlencode() {  # percent-encode all but RFC 3986 unreserved characters (bytewise)
    local LC_ALL=C s="$1" out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c="${s:i:1}"
        case "$c" in [A-Za-z0-9._~-]) out+="$c" ;; *) out+="$(printf '%%%02X' "'$c")" ;; esac
    done
    printf '%s' "$out"
}
PG_PW_URL="$(urlencode "$PG_PASSWORD")"
POSTGRES_URL="postgresql://dmdopt:${PG_PW_URL}@127.0.0.1:${PG_PORT}/dmdopt"
say "PostgreSQL up: postgresql://dmdopt:***@127.0.0.1:${PG_PORT}/dmdopt"

# ------------------------------------------------------------------ MLflow server
MLFLOW="${MLFLOW:-$(command -v mlflow || true)}"
[ -n "$MLFLOW" ] && [ -x "$MLFLOW" ] || die "mlflow executable not found (activate the venv, or set MLFLOW=/path/to/mlflow)"

# A REST call (not just /health: it also needs the backend store and the Host check to pass),
# over bash's /dev/tcp -- a bare Debian has no curl.
http_health() {
    local reply
    reply="$(timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 && \
        printf 'GET /api/2.0/mlflow/experiments/search?max_results=1 HTTP/1.0\r\nHost: 127.0.0.1:$1\r\n\r\n' >&3 \
        && head -n 1 <&3" 2>/dev/null)" || return 1
    case "$reply" in "HTTP/"*" 200"*) return 0 ;; *) return 1 ;; esac
}
port_in_use() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

MLFLOW_PORT=""
if [ -f "$STATE/mlflow.pid" ] && [ -f "$STATE/mlflow.port" ] \
        && kill -0 "$(cat "$STATE/mlflow.pid")" 2>/dev/null && http_health "$(cat "$STATE/mlflow.port")"; then
    MLFLOW_PORT="$(cat "$STATE/mlflow.port")"
    say "MLflow already up on 127.0.0.1:$MLFLOW_PORT (pid $(cat "$STATE/mlflow.pid"))"
else
    for port in $(seq "$MLFLOW_PORT0" $((MLFLOW_PORT0 + 20))); do
        port_in_use "$port" || { MLFLOW_PORT="$port"; break; }
    done
    [ -n "$MLFLOW_PORT" ] || die "no free port in $MLFLOW_PORT0..$((MLFLOW_PORT0 + 20))"
    mkdir -p "$STATE/mlartifacts"
    extra=()
    # MLflow >= 3.5 checks the Host header; allow exactly the loopback names we use.
    if "$MLFLOW" server --help 2>/dev/null | grep -q -- '--allowed-hosts'; then
        extra+=(--allowed-hosts "127.0.0.1:$MLFLOW_PORT,localhost:$MLFLOW_PORT,127.0.0.1,localhost")
    fi
    say "starting mlflow server on 127.0.0.1:$MLFLOW_PORT (log $STATE/mlflow.log)"
    # MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no background job runner (a handful of huey
    # consumer processes we do not need for tracking) -- keeps a small CI machine free.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid nohup "$MLFLOW" server \
        --backend-store-uri "sqlite:///$STATE/mlflow.db" \
        --serve-artifacts --artifacts-destination "$STATE/mlartifacts" \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 "${extra[@]}" \
        >"$STATE/mlflow.log" 2>&1 </dev/null &
    echo $! >"$STATE/mlflow.pid"
    echo "$MLFLOW_PORT" >"$STATE/mlflow.port"
    for _ in $(seq 1 180); do  # the first start migrates the sqlite schema: tens of seconds
        http_health "$MLFLOW_PORT" && break
        kill -0 "$(cat "$STATE/mlflow.pid")" 2>/dev/null || { tail -n 30 "$STATE/mlflow.log" >&2; die "mlflow server exited"; }
        sleep 1
    done
    http_health "$MLFLOW_PORT" || { tail -n 30 "$STATE/mlflow.log" >&2; die "mlflow server does not answer on 127.0.0.1:$MLFLOW_PORT"; }
    say "MLflow up on 127.0.0.1:$MLFLOW_PORT"
fi
MLFLOW_URI="http://127.0.0.1:$MLFLOW_PORT"

# ------------------------------------------------------------------ exports for the caller
umask 077  # the file holds the database password
{
    echo "export DMDOPT_TEST_POSTGRES_URL='$POSTGRES_URL'"
    echo "export DMDOPT_TEST_MLFLOW_URI='$MLFLOW_URI'"
} >"$ENV_FILE"
say "wrote $ENV_FILE"
