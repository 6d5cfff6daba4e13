use serde_json::json;

use super::*;

fn minimal() -> Value {
    json!({
        "name": "text.uppercase",
        "description": "Convert text to uppercase",
        "code": "const { text } = args;\nreturn { upper: String(text).toUpperCase() };"
    })
}

fn errors(v: Value) -> ValidationErrors {
    ToolDefinition::parse(&v).expect_err("definition should be rejected")
}

#[test]
fn minimal_definition_gets_defaults() {
    let parsed = ToolDefinition::parse(&minimal()).unwrap();
    let d = parsed.definition;
    assert_eq!(d.name.as_str(), "text.uppercase");
    assert_eq!(d.input_schema.get("type"), Some(&json!("object")));
    assert_eq!(d.limits, Limits::default());
    assert_eq!(d.retry, RetryPolicy::default());
    assert!(d.permissions.network.is_empty(), "network is denied by default");
    assert!(parsed.warnings.is_empty());
}

#[test]
fn round_trips_through_camel_case_json() {
    let mut v = minimal();
    v["inputSchema"] = json!({"type": "object", "properties": {"text": {"type": "string"}}});
    v["limits"] = json!({"timeoutMs": 5000, "memoryMb": 64, "maxOutputBytes": 1000});
    v["retry"] = json!({"maxAttempts": 5, "initialDelayMs": 10, "backoffFactor": 1.5, "maxDelayMs": 100});
    v["permissions"] = json!({"network": ["b.example.com", "a.example.com:443", "b.example.com"]});
    v["annotations"] = json!({"readOnlyHint": true});
    let d = ToolDefinition::parse(&v).unwrap().definition;
    let wire = d.to_value();
    assert_eq!(wire["limits"]["timeoutMs"], json!(5000));
    assert_eq!(wire["permissions"]["network"], json!(["a.example.com:443", "b.example.com"]));
    assert_eq!(wire["annotations"], json!({"readOnlyHint": true}));
    let again = ToolDefinition::parse(&wire).unwrap().definition;
    assert_eq!(again, d);
    let decoded: ToolDefinition = serde_json::from_value(wire).unwrap();
    assert_eq!(decoded, d);
}

#[test]
fn tool_names_follow_mcp_rules() {
    for ok in ["a", "weather", "text.uppercase", "add-numbers", "A_1", &"x".repeat(64)] {
        assert!(ToolName::parse(ok).is_ok(), "{ok} should be valid");
    }
    for bad in ["", "1abc", "_x", ".x", "has space", "ünï", "a/b", &"x".repeat(65)] {
        assert!(ToolName::parse(bad).is_err(), "{bad:?} should be invalid");
    }
}

#[test]
fn every_problem_is_reported_with_its_field() {
    let e = errors(json!({
        "name": "9lives",
        "description": "",
        "code": "  ",
        "limits": {"timeoutMs": 0, "memoryMb": 1},
        "retry": {"maxAttempts": 0, "backoffFactor": 0.5, "initialDelayMs": 500, "maxDelayMs": 100},
        "permissions": {"network": ["https://evil.com/x", "ok.com"]}
    }));
    for field in [
        "name",
        "description",
        "code",
        "limits.timeoutMs",
        "limits.memoryMb",
        "retry.maxAttempts",
        "retry.backoffFactor",
        "retry.maxDelayMs",
        "permissions.network[0]",
    ] {
        assert_eq!(e.for_field(field).len(), 1, "expected one error for {field}, got: {e}");
    }
    assert!(e.to_string().contains("limits.timeoutMs: must be between 1 and 900000 (got 0)"), "{e}");
}

#[test]
fn missing_required_fields_are_named() {
    let e = errors(json!({}));
    for field in ["name", "description", "code"] {
        assert_eq!(e.for_field(field)[0].message, "required");
    }
}

#[test]
fn wrong_types_and_unknown_fields_name_the_path() {
    let mut v = minimal();
    v["limits"] = json!({"timeoutMs": "soon"});
    let e = errors(v);
    assert_eq!(e.0[0].field, "limits.timeoutMs", "{e}");

    let mut v = minimal();
    v["limits"] = json!({"timeoutMS": 10});
    let e = errors(v);
    assert!(e.0[0].message.contains("unknown field `timeoutMS`"), "{e}");

    let e = errors(json!("not an object"));
    assert_eq!(e.0[0].field, "definition");
}

#[test]
fn schemas_must_be_valid_object_schemas() {
    let mut v = minimal();
    v["inputSchema"] = json!({"type": "object", "properties": {"x": {"type": "integr"}}});
    let e = errors(v);
    assert!(e.for_field("inputSchema")[0].message.contains("not a valid JSON Schema"), "{e}");

    let mut v = minimal();
    v["inputSchema"] = json!({"type": "string"});
    let e = errors(v);
    assert!(e.for_field("inputSchema")[0].message.contains("must be \"object\""), "{e}");

    let mut v = minimal();
    v["outputSchema"] = json!([1, 2]);
    assert_eq!(errors(v).for_field("outputSchema").len(), 1);

    let mut v = minimal();
    v["inputSchema"] = json!({"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}});
    assert_eq!(errors(v).for_field("inputSchema").len(), 1, "remote refs are never fetched");

    let mut v = minimal();
    v["inputSchema"] = json!({"type": "object", "properties": {"x": {"type": "string", "pattern": "(unclosed"}}});
    assert_eq!(errors(v).for_field("inputSchema").len(), 1);
}

#[test]
fn schema_without_type_is_normalised_with_a_warning() {
    let mut v = minimal();
    v["inputSchema"] = json!({"properties": {"x": {"type": "number"}}});
    let parsed = ToolDefinition::parse(&v).unwrap();
    assert_eq!(parsed.definition.input_schema["type"], json!("object"));
    assert_eq!(parsed.warnings, vec!["inputSchema had no \"type\"; set to \"object\"".to_owned()]);
}

#[test]
fn oversized_code_is_rejected() {
    let mut v = minimal();
    v["code"] = json!("x".repeat(ToolDefinition::MAX_CODE_BYTES + 1));
    assert!(errors(v).for_field("code")[0].message.contains("over the limit"));
}

#[test]
fn code_hash_is_hex_sha256() {
    let d = ToolDefinition::parse(&minimal()).unwrap().definition;
    let h = d.code_sha256();
    assert_eq!(h.len(), 64);
    assert!(h.bytes().all(|b| b.is_ascii_hexdigit()));
}
