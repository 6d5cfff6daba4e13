//! The meta tools' names, descriptions, input and output schemas, as MCP lists them.

use serde_json::{Value, json};

/// Tool names starting with this are Kiln's own (one-off `code_eval` tools): refused at
/// `tool_create`, never listed, and changes to them notify nobody.
pub const RESERVED_PREFIX: &str = "kiln.";

pub const META_TOOLS: &[&str] = &[
    "tool_create",
    "tool_update",
    "tool_get",
    "tool_versions",
    "tool_list",
    "tool_enable",
    "tool_disable",
    "tool_delete",
    "tool_run",
    "code_eval",
    "run_get",
    "run_list",
    "run_cancel",
    "run_replay",
];

pub fn is_meta(name: &str) -> bool {
    META_TOOLS.contains(&name)
}

fn definition_properties() -> Value {
    json!({
        "title": {"type": "string", "description": "Human-readable title."},
        "description": {"type": "string", "description": "What the tool does; models read this to decide when to call it."},
        "code": {"type": "string", "description": "JavaScript or TypeScript, run in Deno. One of: a module with `export default async function (args, ctx) {...}`; an expression such as `(args) => args.x * args.y`; or a function body using `args` (or `context`) and `ctx`, ending in `return ...`."},
        "inputSchema": {"type": "object", "description": "JSON Schema of the arguments (type object). Default: any object."},
        "outputSchema": {"type": "object", "description": "JSON Schema the result must match (type object)."},
        "permissions": {"type": "object", "properties": {"network": {"type": "array", "items": {"type": "string"}, "description": "Hosts (host or host:port) the tool may connect to; within your own grant."}}},
        "limits": {"type": "object", "properties": {"timeoutMs": {"type": "integer"}, "memoryMb": {"type": "integer"}, "maxOutputBytes": {"type": "integer"}}},
        "retry": {"type": "object", "properties": {"maxAttempts": {"type": "integer"}, "initialDelayMs": {"type": "integer"}, "backoffFactor": {"type": "number"}, "maxDelayMs": {"type": "integer"}}},
        "annotations": {"type": "object", "description": "MCP tool annotations (readOnlyHint, destructiveHint, idempotentHint, openWorldHint, title)."}
    })
}

fn published_output() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "integer"},
            "codeSha256": {"type": "string"},
            "warnings": {"type": "array", "items": {"type": "string"}}
        },
        "required": ["name", "version", "codeSha256", "warnings"]
    })
}

fn lifecycle_input(verb: &str) -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "expectedVersion": {"type": "integer", "description": format!("Only {verb} if the tool's current version is this one.")}
        },
        "required": ["name"],
        "additionalProperties": false
    })
}

fn lifecycle_output() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "state": {"type": "string", "enum": ["enabled", "disabled", "deleted"]},
            "version": {"type": "integer"},
            "changed": {"type": "boolean"}
        },
        "required": ["name", "state", "version", "changed"]
    })
}

fn run_view_output() -> Value {
    json!({
        "type": "object",
        "properties": {
            "runId": {"type": "string"},
            "tool": {"type": "string"},
            "toolVersion": {"type": "integer"},
            "status": {"type": "string"},
            "attempts": {"type": "integer"},
            "output": {},
            "error": {},
            "arguments": {},
            "replayOf": {"type": "string"},
            "parentRun": {"type": "string"},
            "timeline": {"type": "array", "description": "includeTimeline: every event of the run, in order.", "items": {"type": "object", "properties": {
                "position": {"type": "integer"}, "streamVersion": {"type": "integer"}, "at": {"type": "string"},
                "type": {"type": "string"}, "actor": {"type": "string"}, "payload": {}
            }}},
            "children": {"type": "array", "items": {"type": "object"}},
            "replays": {"type": "array", "items": {"type": "object"}}
        },
        "required": ["runId", "tool", "toolVersion", "status", "attempts"]
    })
}

fn run_statuses() -> Value {
    json!(["queued", "running", "retry_scheduled", "succeeded", "failed", "cancelled", "timed_out"])
}

fn replay_output() -> Value {
    json!({
        "type": "object",
        "properties": {
            "runId": {"type": "string", "description": "The new run."},
            "replayOf": {"type": "string", "description": "The run replayed."},
            "tool": {"type": "string"},
            "toolVersion": {"type": "integer"},
            "status": {"type": "string"},
            "output": {},
            "error": {"type": "object", "properties": {"kind": {"type": "string"}, "name": {"type": "string"}, "message": {"type": "string"}}},
            "diff": {"type": "object", "description": "Once the replay has ended: the two outcomes compared.", "properties": {
                "original": {"type": "object"}, "replay": {"type": "object"}, "same": {"type": "boolean"},
                "changes": {"type": "array", "items": {"type": "object", "properties": {
                    "kind": {"type": "string", "enum": ["added", "removed", "changed"]},
                    "path": {"type": "string", "description": "JSON Pointer into {status, output} or {status, error}."},
                    "before": {}, "after": {}
                }, "required": ["kind", "path"]}}
            }, "required": ["original", "replay", "same", "changes"]},
            "notReplayed": {"type": "string", "description": "Bulk only: why this run could not be replayed."}
        },
        "required": ["replayOf"]
    })
}

fn call_output() -> Value {
    json!({
        "type": "object",
        "description": "The tool's structured result; or, when the run outlives the wait budget, {runId, status} to follow with run_get."
    })
}

/// Every meta tool as an MCP tool (JSON, deserialized into rmcp's type by the caller).
pub fn meta_tools() -> Vec<Value> {
    let mut create_props = definition_properties();
    create_props["name"] =
        json!({"type": "string", "description": "1-64 characters of A-Z a-z 0-9 . _ - starting with a letter."});
    let mut update_props = definition_properties();
    update_props["name"] = json!({"type": "string"});
    update_props["expectedVersion"] = json!({"type": "integer", "description": "The version you last saw; the update is refused if the tool changed since."});
    vec![
        json!({
            "name": "tool_create",
            "title": "Create a tool",
            "description": "Create a new tool at runtime. It is listed right away under its own name (clients that cache the tool list can call it through tool_run). Returns its version and code hash; warnings say what was normalised.",
            "inputSchema": {"type": "object", "properties": create_props, "required": ["name", "description", "code"], "additionalProperties": false},
            "outputSchema": published_output(),
            "annotations": {"readOnlyHint": false, "destructiveHint": false, "idempotentHint": false, "openWorldHint": false}
        }),
        json!({
            "name": "tool_update",
            "title": "Update a tool",
            "description": "Publish a new immutable version of a tool with the given fields changed (a field set to null goes back to its default). Pass expectedVersion to refuse the update if someone changed the tool meanwhile.",
            "inputSchema": {"type": "object", "properties": update_props, "required": ["name"], "additionalProperties": false},
            "outputSchema": published_output(),
            "annotations": {"readOnlyHint": false, "destructiveHint": false, "idempotentHint": false, "openWorldHint": false}
        }),
        json!({
            "name": "tool_get",
            "title": "Get a tool",
            "description": "A tool's full definition, code included (the current version, or the given one).",
            "inputSchema": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "integer"}}, "required": ["name"], "additionalProperties": false},
            "outputSchema": {"type": "object", "properties": {
                "name": {"type": "string"}, "version": {"type": "integer"}, "currentVersion": {"type": "integer"},
                "state": {"type": "string"}, "codeSha256": {"type": "string"}, "actor": {"type": "string"},
                "publishedAt": {"type": "string"}, "definition": {"type": "object"}
            }, "required": ["name", "version", "state", "codeSha256", "definition"]},
            "annotations": {"readOnlyHint": true, "openWorldHint": false}
        }),
        json!({
            "name": "tool_versions",
            "title": "A tool's history",
            "description": "Every published version of a tool: number, who published it, when, and the code's SHA-256.",
            "inputSchema": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"], "additionalProperties": false},
            "outputSchema": {"type": "object", "properties": {
                "name": {"type": "string"}, "state": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "object", "properties": {
                    "version": {"type": "integer"}, "actor": {"type": "string"}, "publishedAt": {"type": "string"}, "codeSha256": {"type": "string"}
                }}}
            }, "required": ["name", "versions"]},
            "annotations": {"readOnlyHint": true, "openWorldHint": false}
        }),
        json!({
            "name": "tool_list",
            "title": "List every tool",
            "description": "Every tool the server has now, including ones created after your client cached its tool list (marked runtime: true). Call them with tool_run.",
            "inputSchema": {"type": "object", "properties": {"includeDisabled": {"type": "boolean"}, "includeCode": {"type": "boolean"}}, "additionalProperties": false},
            "outputSchema": {"type": "object", "properties": {"tools": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "title": {"type": "string"}, "description": {"type": "string"}, "version": {"type": "integer"},
                "state": {"type": "string"}, "runtime": {"type": "boolean"}, "codeSha256": {"type": "string"},
                "inputSchema": {"type": "object"}, "outputSchema": {"type": "object"}, "code": {"type": "string"}
            }}}}, "required": ["tools"]},
            "annotations": {"readOnlyHint": true, "openWorldHint": false}
        }),
        json!({
            "name": "tool_enable", "title": "Enable a tool", "description": "Enable a disabled tool so it can be called again.",
            "inputSchema": lifecycle_input("enable"), "outputSchema": lifecycle_output(),
            "annotations": {"readOnlyHint": false, "destructiveHint": false, "idempotentHint": true, "openWorldHint": false}
        }),
        json!({
            "name": "tool_disable", "title": "Disable a tool", "description": "Disable a tool: calls to it are refused until it is enabled again. Its history stays.",
            "inputSchema": lifecycle_input("disable"), "outputSchema": lifecycle_output(),
            "annotations": {"readOnlyHint": false, "destructiveHint": false, "idempotentHint": true, "openWorldHint": false}
        }),
        json!({
            "name": "tool_delete", "title": "Delete a tool", "description": "Delete a tool from the catalog. Its history (every version and run) is kept; the name can be created again.",
            "inputSchema": lifecycle_input("delete"), "outputSchema": lifecycle_output(),
            "annotations": {"readOnlyHint": false, "destructiveHint": true, "idempotentHint": true, "openWorldHint": false}
        }),
        json!({
            "name": "tool_run",
            "title": "Run any tool by name",
            "description": "Call any tool by name, including tools created after your client cached its tool list. Every call is a durable, recorded run.",
            "inputSchema": {"type": "object", "properties": {
                "name": {"type": "string"},
                "arguments": {"type": "object", "description": "The tool's arguments (checked against its inputSchema)."},
                "version": {"type": "integer", "description": "Run this version instead of the current one."},
                "idempotencyKey": {"type": "string", "description": "The same key (for you) always names the same run: a retried call does not run twice."}
            }, "required": ["name"], "additionalProperties": false},
            "outputSchema": call_output(),
            "annotations": {"openWorldHint": true}
        }),
        json!({
            "name": "code_eval",
            "title": "Run one-off code",
            "description": "Run JavaScript/TypeScript once without creating a tool (same code formats as tool_create). Still a recorded run.",
            "inputSchema": {"type": "object", "properties": {
                "code": {"type": "string"},
                "arguments": {"type": "object"},
                "permissions": {"type": "object", "properties": {"network": {"type": "array", "items": {"type": "string"}}}},
                "timeoutMs": {"type": "integer"}
            }, "required": ["code"], "additionalProperties": false},
            "outputSchema": call_output(),
            "annotations": {"openWorldHint": true}
        }),
        json!({
            "name": "run_get", "title": "Get a run", "description": "A run's status, attempts, arguments, and output or error. With includeTimeline, also every event of the run (attempts, steps with their recorded results, logs, errors with stack, retry decisions), its child runs and its replays.",
            "inputSchema": {"type": "object", "properties": {
                "runId": {"type": "string"},
                "includeTimeline": {"type": "boolean", "description": "Add timeline, children and replays (as `kiln runs show`)."}
            }, "required": ["runId"], "additionalProperties": false},
            "outputSchema": run_view_output(),
            "annotations": {"readOnlyHint": true, "openWorldHint": false}
        }),
        json!({
            "name": "run_list", "title": "List runs", "description": "Runs, newest first, filtered by tool, status, actor and request time. Pass nextCursor back as cursor for the next page.",
            "inputSchema": {"type": "object", "properties": {
                "tool": {"type": "string"},
                "status": {"type": "string", "enum": run_statuses()},
                "actor": {"type": "string", "description": "Who requested the run: local, key:NAME, jwt:SUB."},
                "since": {"type": "string", "description": "Requested at or after (RFC 3339 or YYYY-MM-DD, UTC)."},
                "until": {"type": "string", "description": "Requested before (RFC 3339 or YYYY-MM-DD, UTC)."},
                "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
                "cursor": {"type": "string"}
            }, "additionalProperties": false},
            "outputSchema": {"type": "object", "properties": {"runs": {"type": "array", "items": {"type": "object"}}, "nextCursor": {"type": "string"}}, "required": ["runs"]},
            "annotations": {"readOnlyHint": true, "openWorldHint": false}
        }),
        json!({
            "name": "run_cancel", "title": "Cancel a run", "description": "Cancel a queued or running run. A run that already ended is left as it is.",
            "inputSchema": {"type": "object", "properties": {"runId": {"type": "string"}}, "required": ["runId"], "additionalProperties": false},
            "outputSchema": {"type": "object", "properties": {"runId": {"type": "string"}, "cancelled": {"type": "boolean"}, "status": {"type": "string"}}, "required": ["runId", "cancelled", "status"]},
            "annotations": {"readOnlyHint": false, "destructiveHint": true, "idempotentHint": true, "openWorldHint": false}
        }),
        json!({
            "name": "run_replay", "title": "Replay a run",
            "description": "Run a past run again with its original arguments, as a new run linked to it by replayOf, and compare the outcomes: the diff lists each change between {status, output} or {status, error} as a JSON Pointer. version picks the tool version (the recorded one by default, \"latest\", or a number), so a fix can be tried on the input that failed; reuseSteps answers durable steps from the original's recorded results so side effects are not repeated. Waits up to waitMs (at most the server's call budget), else answers with the new run's id to follow with run_get. With tool instead of runId, replays that tool's runs in a status (default failed) and time range, oldest first, up to limit, and answers {replays: [...]}.",
            "inputSchema": {"type": "object", "properties": {
                "runId": {"type": "string", "description": "The run to replay."},
                "version": {"oneOf": [{"type": "string", "enum": ["recorded", "latest"]}, {"type": "integer", "minimum": 1}]},
                "reuseSteps": {"type": "boolean", "description": "Reuse the original's recorded step results (default false: run every step again)."},
                "waitMs": {"type": "integer", "minimum": 0, "description": "How long to wait for the replay to end (capped by the server's call budget)."},
                "tool": {"type": "string", "description": "Bulk: replay this tool's runs (instead of runId)."},
                "status": {"type": "string", "enum": run_statuses(), "description": "Bulk: the runs' status (default failed)."},
                "since": {"type": "string", "description": "Bulk: requested at or after (RFC 3339 or YYYY-MM-DD)."},
                "until": {"type": "string", "description": "Bulk: requested before."},
                "limit": {"type": "integer", "minimum": 1, "maximum": 100, "description": "Bulk: at most this many, oldest first (default 10)."}
            }, "additionalProperties": false},
            "outputSchema": {"type": "object", "description": "One replay (runId given), or {replays, selected, more} (tool given).", "properties": {
                "runId": {"type": "string"}, "replayOf": {"type": "string"}, "tool": {"type": "string"},
                "toolVersion": {"type": "integer"}, "status": {"type": "string"}, "output": {}, "error": {"type": "object"},
                "diff": replay_output()["properties"]["diff"].clone(),
                "replays": {"type": "array", "items": replay_output()},
                "selected": {"type": "integer"},
                "more": {"type": "integer", "description": "Matching runs left out by limit."}
            }},
            "annotations": {"readOnlyHint": false, "destructiveHint": false, "idempotentHint": false, "openWorldHint": true}
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_meta_tool_has_schemas_and_a_listed_name() {
        let tools = meta_tools();
        assert_eq!(tools.len(), META_TOOLS.len());
        for (t, name) in tools.iter().zip(META_TOOLS) {
            assert_eq!(t["name"], *name);
            assert_eq!(t["inputSchema"]["type"], "object", "{name}");
            assert_eq!(t["outputSchema"]["type"], "object", "{name}");
            jsonschema::validator_for(&t["inputSchema"]).unwrap();
            jsonschema::validator_for(&t["outputSchema"]).unwrap();
        }
    }
}
