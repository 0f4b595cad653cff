#!/usr/bin/env python3
"""Validates Kubernetes objects offline, strictly (an unknown field is an error, as the
API server's strict field validation makes it):

- custom resources against the openAPIV3Schema of the served version of their
  CustomResourceDefinition in --crds (the upstream CRD files), with
  `additionalProperties: false` added to every object schema that lists `properties`
  and neither sets `additionalProperties` nor `x-kubernetes-preserve-unknown-fields`,
  and metadata checked as ObjectMeta's common fields;
- built-in kinds with kubernetes-validate (`--strict`, the Kubernetes version given).

A kind known to neither fails. CEL rules (x-kubernetes-validations) are not evaluated.

  validate-manifests.py --crds DIR [--kubernetes-version 1.33.0] [--quiet] FILE...

Prints one line per object (--quiet: per failing object) and a count; exits 1 if any
object fails. Needs jsonschema, PyYAML and
kubernetes-validate (scripts/check-deploy.sh installs them into .venv-test).
"""
import argparse
import copy
import glob
import os
import sys

import jsonschema
import kubernetes_validate
import yaml

# ObjectMeta as a manifest sets it (what the server fills in is refused here).
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict(schema):
    """A copy of an OpenAPI v3 schema that refuses unknown fields, knows `nullable` and
    has patterns Python's re compiles."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    s = {k: strict(v) if k in ("items", "not", "allOf", "anyOf", "oneOf", "additionalProperties") else v
         for k, v in schema.items()}
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    # Go's RE2 takes a flag group anywhere (`^(?i)(abort|warn)?$`); Python only first.
    if isinstance(s.get("pattern"), str) and "(?i)" in s["pattern"][1:]:
        s["pattern"] = "(?i)" + s["pattern"].replace("(?i)", "")
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    return s


def load_crds(directory):
    """{(apiVersion, kind): (validator or None when not served, CRD file)}"""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.yaml"))):
        for crd in yaml.safe_load_all(open(path)):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                key = (f"{group}/{v['name']}", kind)
                if not v.get("served"):
                    out[key] = (None, path)
                    continue
                schema = strict(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
                schema.setdefault("properties", {})["metadata"] = OBJECT_META
                schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
                jsonschema.Draft4Validator.check_schema(schema)
                out[key] = (jsonschema.Draft4Validator(schema), path)
    return out


def where(error):
    return "/".join(str(p) for p in error.absolute_path) or "(top)"


def validate(doc, crds, k8s_version):
    """Error messages for one object, and what it was checked against."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in crds:
        validator, path = crds[key]
        if validator is None:
            return [f"{key[0]} is not a served version of {key[1]} ({os.path.basename(path)})"], "CRD"
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        return [f"{where(e)}: {e.message}" for e in errors], f"CRD {os.path.basename(path)}"
    try:
        kubernetes_validate.validate(doc, k8s_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {key[1]} {key[0]}: neither a CRD in --crds nor a built-in kind"], "nothing"
    except kubernetes_validate.ValidationError as e:
        return [f"{where(e)}: {e.message}"], f"Kubernetes {k8s_version}"
    return [], f"Kubernetes {k8s_version}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--crds", required=True)
    ap.add_argument("--kubernetes-version", default="1.33.0")
    ap.add_argument("--quiet", action="store_true", help="print failures and the count only")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    crds = load_crds(args.crds)
    failed = checked = 0
    seen = set()
    for f in args.files:
        for doc in yaml.safe_load_all(open(f)):
            if not doc:
                continue
            checked += 1
            seen.add(str(doc.get("kind")))
            name = f"{f}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            errors, against = validate(doc, crds, args.kubernetes_version)
            if errors:
                failed += 1
                print(f"FAIL {name} ({against})")
                for e in errors:
                    print(f"     {e}")
            elif not args.quiet:
                print(f"ok   {name} ({against})")
    if not checked:
        print("no objects")
        sys.exit(1)
    kinds = sorted({d for d in seen})
    print(f"{checked - failed}/{checked} objects valid ({', '.join(kinds)})")
    sys.exit(1 if failed else 0)


main()
