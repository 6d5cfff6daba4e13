//! Checking a run's arguments against its tool's `inputSchema`, reporting every violation with
//! where it is, so a model can correct all of them at once.

use serde::Serialize;
use serde_json::Value;

use crate::tool::ToolDefinition;

/// One way the arguments break the schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Violation {
    /// JSON Pointer into the arguments (`""` is the whole object, `/city` a field).
    pub path: String,
    pub message: String,
}

/// The arguments do not match the tool's input schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct InvalidArguments {
    pub tool: String,
    pub violations: Vec<Violation>,
}

impl std::fmt::Display for InvalidArguments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "arguments for tool \"{}\" do not match its inputSchema: ", self.tool)?;
        for (i, v) in self.violations.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            let at = if v.path.is_empty() { "(root)" } else { &v.path };
            write!(f, "{at}: {}", v.message)?;
        }
        Ok(())
    }
}

/// A compiled input schema; compile once per tool version and reuse.
#[derive(Debug)]
pub struct ArgumentValidator {
    tool: String,
    validator: jsonschema::Validator,
}

impl ArgumentValidator {
    /// Compiles the definition's input schema (which validation at create time proved compiles).
    pub fn new(definition: &ToolDefinition) -> Result<Self, String> {
        let schema = Value::Object(definition.input_schema.clone());
        let validator = jsonschema::validator_for(&schema).map_err(|e| e.to_string())?;
        Ok(Self { tool: definition.name.to_string(), validator })
    }

    /// Every violation, or `Ok` if there is none.
    pub fn check(&self, arguments: &Value) -> Result<(), InvalidArguments> {
        let violations: Vec<Violation> = self
            .validator
            .iter_errors(arguments)
            .map(|e| Violation { path: e.instance_path().to_string(), message: e.to_string() })
            .collect();
        if violations.is_empty() { Ok(()) } else { Err(InvalidArguments { tool: self.tool.clone(), violations }) }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_violation_is_reported_with_its_path() {
        let d = ToolDefinition::parse(&json!({
            "name": "weather",
            "description": "d",
            "code": "return 1",
            "inputSchema": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                "required": ["city"],
                "additionalProperties": false
            }
        }))
        .unwrap()
        .definition;
        let v = ArgumentValidator::new(&d).unwrap();
        v.check(&json!({"city": "Oslo", "days": 2})).unwrap();
        let err = v.check(&json!({"days": 0, "unit": "C"})).unwrap_err();
        assert_eq!(err.violations.len(), 3, "{err}");
        assert!(
            err.violations.iter().any(|x| x.path.is_empty() && x.message.contains("\"city\" is a required property"))
        );
        assert!(err.violations.iter().any(|x| x.path == "/days"));
        assert!(err.to_string().starts_with("arguments for tool \"weather\" do not match its inputSchema: "), "{err}");
        assert_eq!(v.check(&json!("not an object")).unwrap_err().violations.len(), 1);
    }
}
