#!/usr/bin/env python3
"""Writes the PrometheusRule of the kustomize component
deploy/kubernetes/components/prometheus-rule/ from deploy/prometheus/keyrotd-rules.yaml,
the one source of the rules: its `groups:` block, verbatim, becomes `spec.groups`.

  scripts/gen-prometheusrule.py           write the component's prometheusrule.yaml
  scripts/gen-prometheusrule.py --check   exit 1 (naming what differs) unless the
                                          committed file is exactly what it would write

scripts/check-deploy.sh runs --check. Needs PyYAML only for --check's report.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = "deploy/prometheus/keyrotd-rules.yaml"
OUT = "deploy/kubernetes/components/prometheus-rule/prometheusrule.yaml"

HEADER = f"""\
# GENERATED from {RULES} by scripts/gen-prometheusrule.py: do not edit.
# Edit the rules file (and its promtool tests), then run the script;
# scripts/check-deploy.sh fails while this file and the rules differ.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: keyrotd
  labels:
    app.kubernetes.io/name: keyrotd
spec:
"""


def render(rules_text):
    lines = rules_text.splitlines()
    try:
        start = lines.index("groups:")
    except ValueError:
        sys.exit(f"{RULES}: no top-level `groups:` line")
    body = [("  " + l) if l.strip() else "" for l in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def differences(committed, wanted):
    """What differs between the two PrometheusRules' groups, rule by rule."""
    import yaml

    def rules(text):
        doc = yaml.safe_load(text) or {}
        out = {}
        for g in (doc.get("spec") or {}).get("groups") or []:
            for r in g.get("rules") or []:
                out[(g.get("name"), r.get("alert") or r.get("record"))] = (g, r)
        return out

    a, b = rules(committed), rules(wanted)
    diff = [f"missing: group {g} rule {n}" for g, n in sorted(b.keys() - a.keys())]
    diff += [f"not in {RULES}: group {g} rule {n}" for g, n in sorted(a.keys() - b.keys())]
    diff += [f"differs: group {g} rule {n}" for (g, n) in sorted(a.keys() & b.keys())
             if a[(g, n)][1] != b[(g, n)][1]]
    ga = {k[0]: {x: y for x, y in v[0].items() if x != "rules"} for k, v in a.items()}
    gb = {k[0]: {x: y for x, y in v[0].items() if x != "rules"} for k, v in b.items()}
    diff += [f"differs: group {g} settings" for g in sorted(ga.keys() & gb.keys()) if ga[g] != gb[g]]
    return diff or ["same rules, other text (comments, formatting or metadata)"]


def main():
    os.chdir(ROOT)
    wanted = render(open(RULES).read())
    if sys.argv[1:] == ["--check"]:
        committed = open(OUT).read() if os.path.exists(OUT) else ""
        if committed != wanted:
            print(f"{OUT} is not generated from {RULES}:")
            print("\n".join("  " + d for d in differences(committed, wanted)))
            print("run scripts/gen-prometheusrule.py")
            sys.exit(1)
        import yaml
        n = sum(len(g["rules"]) for g in yaml.safe_load(wanted)["spec"]["groups"])
        print(f"{n} rules, identical to {RULES}")
    elif sys.argv[1:]:
        sys.exit(__doc__)
    else:
        with open(OUT, "w") as f:
            f.write(wanted)
        print(f"wrote {OUT}")


main()
