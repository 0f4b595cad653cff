#!/usr/bin/env bash
# Screenshot test of `keyrotd report --format html`: serves a small simulated
# organization, renders the report, takes a headless-chromium screenshot and checks the
# PNG is not blank. Installs Debian's chromium when it is missing.
#
#   scripts/report-screenshot.sh [OUT.png]     (default: target/report-screenshot.png)
#
# KEYROTD_BIN picks the binary (default target/debug/keyrotd, built when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${KEYROTD_BIN:-target/debug/keyrotd}
out=${1:-target/report-screenshot.png}
[ -x "$bin" ] || cargo build --locked --bin keyrotd

if ! command -v chromium >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    echo "report screenshot: installing chromium (apt-get)"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core >/dev/null
fi

work=$(mktemp -d)
sim_pid=""
cleanup() {
    [ -z "$sim_pid" ] || kill "$sim_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
admin_key="sk-admin-report-screenshot"
"$bin" --log-format json sim --listen "127.0.0.1:$port" --admin-key "$admin_key" \
    --scenario projects=14,service_accounts=2,keys_per_sa=2,user_keys=2,stale=0.35,inactive=0.2,never_used=0.15,seed=11 \
    >"$work/sim.log" 2>&1 &
sim_pid=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done

cat >"$work/keyrotd.toml" <<TOML
[openai]
base_url = "http://127.0.0.1:$port/v1"
admin_key_env = "KEYROTD_SCREENSHOT_ADMIN_KEY"
[policy]
max_age = "90d"
[stores.local]
type = "file"
dir = "$work/secrets"
[[rotate]]
name = "prod"
project = "prod-*"
service_account = "*"
stores = ["local"]
path = "openai/{project_name}/{service_account_name}"
TOML
KEYROTD_SCREENSHOT_ADMIN_KEY="$admin_key" "$bin" --log-format json --config "$work/keyrotd.toml" \
    report --format html --output "$work/report.html"

mkdir -p "$(dirname "$out")"
rm -f "$out"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$work/chromium" --screenshot="$out" \
    --window-size=1400,1000 "file://$work/report.html" >"$work/chromium.log" 2>&1 || {
    cat "$work/chromium.log" >&2
    exit 1
}

# Not blank: the right size, and the image data has the variety of a rendered page.
python3 - "$out" <<'PY'
import struct, sys, zlib
path = sys.argv[1]
data = open(path, "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
pos, idat, size = 8, b"", None
while pos < len(data):
    n, kind = struct.unpack(">I4s", data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    if kind == b"IHDR":
        size = struct.unpack(">II", body[:8])
    elif kind == b"IDAT":
        idat += body
    pos += 12 + n
pixels = zlib.decompress(idat)
distinct = len(set(pixels))
assert size == (1400, 1000), f"unexpected size {size}"
assert len(data) > 20_000, f"suspiciously small PNG: {len(data)} bytes"
assert distinct >= 64, f"looks blank: {distinct} distinct byte values"
print(f"report screenshot OK: {path} {size[0]}x{size[1]}, {len(data) // 1024} KiB")
PY
