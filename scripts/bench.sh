#!/usr/bin/env bash
# keyrotd's performance measurements, end to end (README "## Performance"):
#
#   scripts/bench.sh                 # everything, 3 runs per figure (medians)
#   RUNS=5 scripts/bench.sh          # more runs
#   scripts/bench.sh scan rotate     # some of: machine scan rotate memory plan
#
# - machine: nproc, CPU model, memory.
# - scan:    examples/bench_scan (2,000 projects × 10 keys, 20 ms latency, concurrency
#            1, 4, 16, 64) against the in-process simulator.
# - rotate:  examples/bench_rotate (500 stale slots, concurrency 16, 20 ms latency) into
#            the file store, and into OpenBao when scripts/test-servers.sh can start it;
#            then examples/bench_incident (`keyrotd rotate --revoke-old now` of one slot,
#            the real binary, 100 ms latency) into the same stores.
# - memory:  peak RSS of `keyrotd once` (release) scanning 20,000 keys served by a
#            separate `keyrotd sim` process, where its heap goes (examples/bench_memory),
#            and RSS / CPU of an idle `keyrotd run`.
# - plan:    `cargo bench --bench plan` (criterion; not part of the default set since
#            it takes a few minutes: ask for it by name).
#
# Builds the release binary and examples first. Every process it starts is stopped by
# pid on exit, and its temp dir removed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
RUNS=${RUNS:-3}
BIN=$ROOT/target/release/keyrotd
SIM_SCENARIO="projects=2000,service_accounts=4,keys_per_sa=2,user_keys=2,stale=0.3,seed=42"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/keyrotd-bench.XXXXXX")
PIDS=()
VAULT_STARTED=0

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local pid
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] || continue
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    if [ "$VAULT_STARTED" = 1 ] && declare -F stop_test_servers >/dev/null; then
        stop_test_servers
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n## %s\n\n' "$*"; }
median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) print "n/a"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
status_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

want() {
    [ "${#SECTIONS[@]}" -eq 0 ] && [ "$1" != plan ] && return 0
    local s
    for s in "${SECTIONS[@]}"; do [ "$s" = "$1" ] && return 0; done
    return 1
}

SECTIONS=("$@")
for s in "${SECTIONS[@]}"; do
    case $s in machine | scan | rotate | memory | plan) ;; *)
        echo "bench.sh: unknown section $s (machine scan rotate memory plan)" >&2
        exit 2
        ;;
    esac
done

machine() {
    say "Machine"
    echo "- nproc: $(nproc)"
    echo "- CPU: $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "- memory: $(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "- kernel: $(uname -r); $(rustc --version)"
    echo "- load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
}

build() {
    echo "building release binary and examples ..." >&2
    cargo build --release --quiet --bin keyrotd --example bench_scan --example bench_rotate \
        --example bench_incident --example bench_memory
}

scan() {
    say "Scan (bench_scan, $RUNS runs, median)"
    "$ROOT/target/release/examples/bench_scan" --runs "$RUNS" 2>"$WORK/scan.log"
}

rotate() {
    local stores=file
    # shellcheck source=scripts/test-servers.sh disable=SC1091
    if source "$ROOT/scripts/test-servers.sh" >"$WORK/servers.log" 2>&1; then
        VAULT_STARTED=1
        stores=file,vault
    else
        echo "(OpenBao could not be started: file store only; see scripts/test-servers.sh)" >&2
        tail -n 5 "$WORK/servers.log" >&2 || true
    fi
    say "Rotation (bench_rotate, $RUNS runs, median)"
    "$ROOT/target/release/examples/bench_rotate" --runs "$RUNS" --stores "$stores" 2>"$WORK/rotate.log"
    say "Incident rotation (bench_incident, 5 runs, median)"
    KEYROTD_BIN="$BIN" "$ROOT/target/release/examples/bench_incident" --runs 5 --stores "$stores" \
        2>"$WORK/incident.log"
    if [ "$VAULT_STARTED" = 1 ]; then
        stop_test_servers
        VAULT_STARTED=0
    fi
}

# Starts `keyrotd sim` on a free port; sets SIM_PID and SIM_URL.
start_sim() {
    local port out=$WORK/sim.out deadline
    port=$(free_port)
    "$BIN" sim --listen "127.0.0.1:$port" --admin-key sk-admin-bench-0123456789 \
        --scenario "$SIM_SCENARIO" >"$out" 2>"$WORK/sim.err" &
    SIM_PID=$!
    PIDS+=("$SIM_PID")
    deadline=$((SECONDS + 120))
    until grep -q '^export KEYROTD__OPENAI__BASE_URL=' "$out" 2>/dev/null; do
        if ! kill -0 "$SIM_PID" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            echo "bench.sh: keyrotd sim did not start:" >&2
            cat "$WORK/sim.err" >&2
            exit 1
        fi
        sleep 0.2
    done
    SIM_URL=$(sed -n 's/^export KEYROTD__OPENAI__BASE_URL=//p' "$out")
}

write_config() {
    # $1: file, $2: concurrency. One rule that matches no project: `once` is a scan.
    cat >"$1" <<EOF
[daemon]
schedule = "0 0 0 1 1 *"
run_on_start = false
concurrency = $2
[openai]
base_url = "$SIM_URL"
admin_key_env = "KEYROTD_BENCH_ADMIN_KEY"
[stores.local]
type = "file"
dir = "$WORK/secrets"
[[rotate]]
name = "none"
project = "no-such-project-*"
service_account = "*"
stores = ["local"]
path = "bench/{project_name}/{service_account_name}"
EOF
}

# Runs `keyrotd once`; appends its peak RSS (kB) to $WORK/rss and wall time to $WORK/wall.
once_rss() {
    local cfg=$1 out=$WORK/time.out
    shift
    env "$@" /usr/bin/time -f '%M %e' -o "$out" \
        "$BIN" --config "$cfg" --log-format json once >/dev/null 2>"$WORK/once.log" || {
        echo "bench.sh: keyrotd once failed:" >&2
        tail -n 5 "$WORK/once.log" >&2
        exit 1
    }
    tail -n 1 "$out" | awk -v rss="$WORK/rss" -v wall="$WORK/wall" \
        '{print $1 >> rss; print $2 >> wall}'
}

memory() {
    [ -x /usr/bin/time ] || {
        echo "bench.sh: /usr/bin/time is missing (Debian: apt-get install time)" >&2
        exit 1
    }
    export KEYROTD_BENCH_ADMIN_KEY=sk-admin-bench-0123456789
    mkdir -p "$WORK/secrets"
    start_sim
    local cfg=$WORK/keyrotd.toml
    write_config "$cfg" 8
    "$BIN" --config "$cfg" check-config >/dev/null

    say "Memory: keyrotd once, 20,000-key scan ($RUNS runs, median; simulator in its own process)"
    echo "| configuration | peak RSS MiB | wall s |"
    echo "|---|---:|---:|"
    local label c extra i
    for variant in "default (concurrency 8)|8|" "concurrency 1|1|" "concurrency 64|64|" \
        "default, MALLOC_ARENA_MAX=1|8|MALLOC_ARENA_MAX=1"; do
        IFS='|' read -r label c extra <<<"$variant"
        write_config "$cfg" "$c"
        : >"$WORK/rss" && : >"$WORK/wall"
        for ((i = 0; i < RUNS; i++)); do
            once_rss "$cfg" ${extra:+"$extra"}
        done
        printf '| %s | %.1f | %s |\n' "$label" "$(median <"$WORK/rss" | awk '{print $1 / 1024}')" \
            "$(median <"$WORK/wall")"
    done

    say "Memory: heap of one cycle (bench_memory, counting allocator)"
    "$ROOT/target/release/examples/bench_memory"

    say "Memory: idle keyrotd run (schedule far away, run_on_start = false)"
    write_config "$cfg" 8
    "$BIN" --config "$cfg" --log-format json run >/dev/null 2>"$WORK/run.log" &
    local run_pid=$!
    PIDS+=("$run_pid")
    sleep 3
    kill -0 "$run_pid" 2>/dev/null || {
        echo "bench.sh: keyrotd run exited:" >&2
        tail -n 5 "$WORK/run.log" >&2
        exit 1
    }
    local t0 t1 hz
    hz=$(getconf CLK_TCK)
    t0=$(cpu_ticks "$run_pid")
    sleep 10
    t1=$(cpu_ticks "$run_pid")
    echo "| figure | value |"
    echo "|---|---:|"
    printf '| RSS after 13 s (VmRSS) | %.1f MiB |\n' "$(status_kb "$run_pid" VmRSS | awk '{print $1 / 1024}')"
    printf '| peak RSS (VmHWM) | %.1f MiB |\n' "$(status_kb "$run_pid" VmHWM | awk '{print $1 / 1024}')"
    echo "| threads | $(status_kb "$run_pid" Threads) |"
    printf '| CPU over 10 s idle (utime+stime) | %d ms |\n' "$(((t1 - t0) * 1000 / hz))"
    kill "$run_pid" 2>/dev/null || true
    wait "$run_pid" 2>/dev/null || true
}

plan() {
    say "Planning (cargo bench --bench plan)"
    cargo bench --bench plan 2>&1 | grep -E '^plan/|time:|thrpt:'
}

want machine && machine
if want scan || want rotate || want memory; then build; fi
want scan && scan
want rotate && rotate
want memory && memory
want plan && plan
exit 0
