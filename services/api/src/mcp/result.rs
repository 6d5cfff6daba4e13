//! Building `tools/call` results: structured successes, tool errors a model can act on, and a
//! finished run's output turned into MCP content (explicit content from `ctx.content`, or the
//! structured result with a text rendering), checked against the tool's `outputSchema`.

use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::{Map, Value, json};

use kiln_worker::runs::RunView;

/// The key `ctx.content(...)` puts its blocks under in a tool's result.
pub const CONTENT_KEY: &str = "mcp/content";
/// The key for the structured part that goes with explicit content.
pub const STRUCTURED_KEY: &str = "mcp/structuredContent";

/// A structured success: the value as `structuredContent` and as JSON text.
pub fn ok(value: Value) -> CallToolResult {
    let text = serde_json::to_string_pretty(&value).unwrap_or_default();
    let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
    r.structured_content = Some(value);
    r
}

/// A tool error: the message first (models read it), then the details as JSON.
pub fn error(code: &str, message: &str, details: Value) -> CallToolResult {
    let mut text = message.to_owned();
    if !details.is_null() {
        text.push_str("\n\n");
        text.push_str(&serde_json::to_string_pretty(&json!({"code": code, "details": details})).unwrap_or_default());
    }
    CallToolResult::error(vec![ContentBlock::text(text)])
}

/// The result of a finished or still-running run.
pub fn from_run(run: &RunView, output_schema: Option<&Map<String, Value>>) -> CallToolResult {
    match run.status {
        "succeeded" => succeeded(run, output_schema),
        "failed" | "timed_out" | "cancelled" => {
            let (kind, message) = match &run.error {
                Some(e) => (e.kind.as_str().to_owned(), e.message.clone()),
                None if run.status == "timed_out" => ("timeout".to_owned(), "the run timed out".to_owned()),
                None => (run.status.to_owned(), format!("the run was {}", run.status)),
            };
            let text = format!("{message}\n\n(run {} of tool \"{}\" {}: {kind})", run.run_id, run.tool, run.status);
            let mut r = CallToolResult::error(vec![ContentBlock::text(text)]);
            r.meta = run_meta(run);
            r
        }
        _ => {
            let handle =
                json!({"runId": run.run_id, "status": run.status, "tool": run.tool, "toolVersion": run.tool_version});
            let text = format!(
                "Run {} is still {} after the wait budget; it carries on. Follow it with run_get {{\"runId\": \"{}\"}}.",
                run.run_id, run.status, run.run_id
            );
            let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
            // A pending run's handle only fits the declared schema if the tool has none.
            if output_schema.is_none() {
                r.structured_content = Some(handle);
            }
            r.meta = run_meta(run);
            r
        }
    }
}

fn succeeded(run: &RunView, output_schema: Option<&Map<String, Value>>) -> CallToolResult {
    let output = run.output.clone().unwrap_or(Value::Null);
    let mut result = match explicit_content(&output) {
        Some(Ok((content, structured))) => {
            let mut r = CallToolResult::success(content);
            r.structured_content = structured;
            r
        }
        Some(Err(message)) => {
            return error("invalid_output", &format!("the tool returned invalid MCP content: {message}"), Value::Null);
        }
        None => {
            // A tool that returned a plain value (wrapped as {"result": v} by the run layer) reads
            // as that value: "42", or the string itself.
            let text = match output.as_object().and_then(|o| o.get("result").filter(|_| o.len() == 1)) {
                Some(Value::String(s)) => s.clone(),
                Some(v) if !v.is_object() => v.to_string(),
                _ => serde_json::to_string(&output).unwrap_or_default(),
            };
            let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
            r.structured_content = Some(output);
            r
        }
    };
    if let Some(schema) = output_schema {
        let checked = result.structured_content.as_ref().unwrap_or(&Value::Null);
        if let Err(violations) = check_output(schema, checked) {
            return error(
                "invalid_output",
                &format!("the tool's result does not match its outputSchema: {}", violations.join("; ")),
                json!({"runId": run.run_id, "violations": violations}),
            );
        }
    }
    result.meta = run_meta(run);
    result
}

/// Content blocks and the structured part that goes with them.
type Explicit = (Vec<ContentBlock>, Option<Value>);

/// `{"mcp/content": [...], "mcp/structuredContent"?: {...}}` as returned by `ctx.content`.
fn explicit_content(output: &Value) -> Option<Result<Explicit, String>> {
    let obj = output.as_object()?;
    let blocks = obj.get(CONTENT_KEY)?;
    if obj.keys().any(|k| k != CONTENT_KEY && k != STRUCTURED_KEY) {
        return None;
    }
    let parsed = (|| {
        let list = blocks.as_array().ok_or("content must be an array of content blocks")?;
        let content = list
            .iter()
            .enumerate()
            .map(|(i, b)| {
                serde_json::from_value::<ContentBlock>(b.clone())
                    .map_err(|e| format!("content[{i}] is not an MCP content block ({e})"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let structured = obj.get(STRUCTURED_KEY).cloned();
        if structured.as_ref().is_some_and(|s| !s.is_object()) {
            return Err("structuredContent must be an object".to_owned());
        }
        Ok((content, structured))
    })();
    Some(parsed)
}

fn check_output(schema: &Map<String, Value>, value: &Value) -> Result<(), Vec<String>> {
    let validator = jsonschema::validator_for(&Value::Object(schema.clone())).map_err(|e| vec![e.to_string()])?;
    let violations: Vec<String> = validator
        .iter_errors(value)
        .map(|e| {
            let at = e.instance_path().to_string();
            format!("{}: {e}", if at.is_empty() { "(root)" } else { &at })
        })
        .collect();
    if violations.is_empty() { Ok(()) } else { Err(violations) }
}

fn run_meta(run: &RunView) -> Option<rmcp::model::MetaObject> {
    serde_json::from_value(
        json!({"kiln/runId": run.run_id, "kiln/status": run.status, "kiln/toolVersion": run.tool_version}),
    )
    .ok()
}
