//! A small JSON Schema checker for the official OpenAPI excerpts: enough of Draft
//! 2020-12 for the component schemas the simulator's responses must follow (`type`,
//! `properties`, `required`, `items`, `enum`, `const`, `anyOf`, `oneOf`, `allOf`,
//! `additionalProperties`, `$ref` into `#/components/schemas/...`). Annotations
//! (`description`, `format`, `example`, `x-*`, `discriminator`) are not checked.
//!
//! `spec/openai-admin-usage-audit-openapi.json` is a copy of the official excerpt
//! (openai/openai-openapi at commit f85dbe2, MIT) kept beside the tests, so they run
//! from any clone.

use std::sync::OnceLock;

use serde_json::Value;

/// The usage, costs and audit-log excerpt, parsed once.
pub fn usage_audit_spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        let text = include_str!("spec/openai-admin-usage-audit-openapi.json");
        serde_json::from_str(text).expect("the spec excerpt is JSON")
    })
}

/// Every way `value` breaks the component schema `name` of `spec` (empty when it
/// conforms), each as `path: what`.
pub fn violations(spec: &Value, name: &str, value: &Value) -> Vec<String> {
    let schema = spec["components"]["schemas"]
        .get(name)
        .unwrap_or_else(|| panic!("no component schema {name}"));
    let mut out = Vec::new();
    check(spec, schema, value, "$", &mut out);
    out
}

/// Panics naming every violation of schema `name` by `value`.
pub fn assert_conforms(name: &str, value: &Value) {
    let errors = violations(usage_audit_spec(), name, value);
    assert!(
        errors.is_empty(),
        "{name} violated:\n  {}\nin {value:#}",
        errors.join("\n  ")
    );
}

fn check(spec: &Value, schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    let Some(schema) = schema.as_object() else {
        // `true` accepts everything, `false` nothing.
        if schema == &Value::Bool(false) {
            out.push(format!("{path}: not allowed"));
        }
        return;
    };
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unsupported $ref {reference}"));
        let target = &spec["components"]["schemas"][name];
        assert!(!target.is_null(), "dangling $ref {reference}");
        check(spec, target, value, path, out);
    }
    if let Some(kind) = schema.get("type") {
        let kinds: Vec<&str> = match kind {
            Value::String(k) => vec![k.as_str()],
            Value::Array(ks) => ks.iter().filter_map(Value::as_str).collect(),
            other => panic!("unsupported type {other}"),
        };
        if !kinds.iter().any(|k| has_type(value, k)) {
            out.push(format!(
                "{path}: expected {}, got {value}",
                kinds.join(" or ")
            ));
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            out.push(format!("{path}: {value} is not one of {options:?}"));
        }
    }
    if let Some(constant) = schema.get("const") {
        if constant != value {
            out.push(format!("{path}: expected {constant}, got {value}"));
        }
    }
    let passes = |s: &Value| {
        let mut errs = Vec::new();
        check(spec, s, value, path, &mut errs);
        errs
    };
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check(spec, s, value, path, out);
        }
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array) {
        let tried: Vec<Vec<String>> = any.iter().map(passes).collect();
        if !tried.iter().any(Vec::is_empty) {
            out.push(format!("{path}: matches none of anyOf: {tried:?}"));
        }
    }
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
        let tried: Vec<Vec<String>> = one.iter().map(passes).collect();
        let matched = tried.iter().filter(|e| e.is_empty()).count();
        if matched != 1 {
            out.push(format!(
                "{path}: matches {matched} of oneOf (exactly 1 wanted): {tried:?}"
            ));
        }
    }
    if let Some(obj) = value.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for field in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(field) {
                    out.push(format!("{path}: missing required {field}"));
                }
            }
        }
        for (field, v) in obj {
            let sub = format!("{path}.{field}");
            let declared = props.and_then(|p| p.get(field));
            if let Some(s) = declared.or_else(|| schema.get("additionalProperties")) {
                check(spec, s, v, &sub, out);
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            check(spec, items, v, &format!("{path}[{i}]"), out);
        }
    }
}

fn has_type(value: &Value, kind: &str) -> bool {
    match kind {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64(),
        other => panic!("unsupported type {other}"),
    }
}

/// The checker itself: each keyword the simulator tests rely on rejects what it must.
#[test]
fn the_checker_rejects_what_the_schemas_forbid() {
    let spec = usage_audit_spec();
    let good = serde_json::json!({
        "id": "audit_log-1", "type": "api_key.created", "effective_at": 1,
        "actor": {"type": "session", "session": {"user": {"id": "u", "email": "a@b.c"}}},
        "api_key.created": {"id": "key_1", "data": {"scopes": ["api.model.read"]}},
    });
    assert_eq!(violations(spec, "AuditLog", &good), Vec::<String>::new());
    let broken = |change: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        change(&mut v);
        violations(spec, "AuditLog", &v)
    };
    // required
    let e = broken(&|v| {
        v.as_object_mut().unwrap().remove("effective_at");
    });
    assert!(
        e.iter()
            .any(|e| e.contains("missing required effective_at")),
        "{e:?}"
    );
    // type (integer), through a property
    assert!(!broken(&|v| v["effective_at"] = "soon".into()).is_empty());
    assert!(!broken(&|v| v["effective_at"] = 1.5.into()).is_empty());
    // enum, through a $ref (AuditLogEventType)
    assert!(!broken(&|v| v["type"] = "api_key.exploded".into()).is_empty());
    // anyOf [AuditLogActor, null]: null passes, a wrong actor type fails
    assert!(broken(&|v| v["actor"] = Value::Null).is_empty());
    assert!(!broken(&|v| v["actor"]["type"] = "robot".into()).is_empty());
    // items of an array nested in a details object
    assert!(
        !broken(&|v| v["api_key.created"]["data"]["scopes"] = serde_json::json!([1])).is_empty()
    );
    // oneOf: a bucket result that is no known result object
    let bucket = serde_json::json!({
        "object": "bucket", "start_time": 0, "end_time": 60,
        "results": [{"object": "organization.usage.nothing"}],
    });
    let e = violations(spec, "UsageTimeBucket", &bucket);
    assert!(e.iter().any(|e| e.contains("oneOf")), "{e:?}");
}
