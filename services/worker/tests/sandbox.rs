//! The Deno sandbox against the real deno: code formats, ctx, limits, error classification,
//! hostile code, and the pool.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use common::*;
use kiln_proto::events::ErrorKind;
use kiln_worker::sandbox::{
    CodeFormat, HostCalls, Invocation, LogLevel, NetPolicy, Permission, Sandbox, SandboxError, SandboxEvent,
    SourcePosition,
};
use serde_json::{Value, json};

mod lookup {
    use std::path::Path;

    use kiln_worker::sandbox::DenoBinary;

    #[test]
    fn deno_is_found_in_the_project_install_and_is_the_pinned_version() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let deno = DenoBinary::locate(None, Some(&root)).expect("run scripts/install-deno.sh");
        assert_eq!(deno.path(), DenoBinary::project_install(&root));
        assert!(deno.version().starts_with("2.9."), "{}", deno.version());
    }
}

mod formats {
    use super::*;

    #[tokio::test]
    async fn es_module_with_default_export_gets_args_and_ctx() {
        let sb = sandbox();
        let t = tool(
            "adder",
            3,
            "export default async function (args, ctx) {\n  return { sum: args.a + args.b, tool: ctx.tool, attempt: ctx.attempt, runId: ctx.runId };\n}",
        );
        let mut inv = Invocation::new(Arc::clone(&t), json!({ "a": 2, "b": 40 }));
        inv.attempt = 2;
        let run_id = inv.run_id;
        let value = sb.invoke(inv).await.unwrap().value;
        assert_eq!(
            value,
            json!({ "sum": 42, "tool": { "name": "adder", "version": 3 }, "attempt": 2, "runId": run_id.to_string() })
        );
    }

    #[tokio::test]
    async fn function_body_seed_uppercases() {
        let sb = sandbox();
        let t = tool("upper", 1, "const { text } = args;\nreturn { upper: String(text).toUpperCase() };");
        assert_eq!(run(&sb, &t, json!({ "text": "kiln" })).await.unwrap(), json!({ "upper": "KILN" }));
    }

    /// The weather seed, unchanged except for the URL: `context` is the arguments object.
    #[tokio::test]
    async fn weather_seed_reads_context_as_arguments() {
        let port = json_server(r#"{"temp": 21.5, "weather": [{"description": "light rain"}]}"#).await;
        let sb = sandbox();
        let code = format!(
            "const response = await fetch(`http://127.0.0.1:{port}/${{context.city}}`);\nconst data = await response.json();\nreturn {{ temp: data.temp, conditions: data.weather[0].description }};"
        );
        let t = tool_with("weather", 1, &code, |t| t.permissions.network = hosts(&[&format!("127.0.0.1:{port}")]));
        let value = run(&sb, &t, json!({ "city": "Oslo" })).await.unwrap();
        assert_eq!(value, json!({ "temp": 21.5, "conditions": "light rain" }));
    }

    /// The exact seed text runs unchanged; without a grant for its host it is contained.
    #[tokio::test]
    async fn weather_seed_verbatim_is_denied_the_undeclared_host() {
        let sb = sandbox();
        let code = "const response = await fetch(`https://api.example.com/${context.city}`);\nconst data = await response.json();\nreturn { temp: data.temp, conditions: data.weather[0].description };";
        let err = run(&sb, &tool("weather", 1, code), json!({ "city": "Oslo" })).await.unwrap_err();
        assert!(matches!(&err, SandboxError::PermissionDenied { permission: Permission::Net, .. }), "{err:?}");
        assert!(err.to_string().contains("api.example.com"), "{err}");
    }

    #[tokio::test]
    async fn single_function_expression_seed_multiplies() {
        let sb = sandbox();
        let t = tool("multiply", 1, "(args) => args.x * args.y");
        assert_eq!(run(&sb, &t, json!({ "x": 6, "y": 7 })).await.unwrap(), json!(42));
        let t = tool("square", 1, "async function square(args) { return args.n ** 2 };");
        assert_eq!(run(&sb, &t, json!({ "n": 9 })).await.unwrap(), json!(81));
    }

    #[tokio::test]
    async fn typescript_is_accepted_in_all_three_formats() {
        let sb = sandbox();
        let cases = [
            (
                "interface Args { x: number; y: number }\nexport default async function (args: Args, ctx: { runId: string }): Promise<number> {\n  const p: number = args.x * args.y;\n  return p;\n}",
                CodeFormat::Module,
            ),
            ("const x: number = args.x;\nconst y = args.y as number;\nreturn x * y;", CodeFormat::Body),
            ("(args: { x: number; y: number }): number => args.x * args.y", CodeFormat::Expression),
        ];
        for (i, (code, format)) in cases.into_iter().enumerate() {
            assert_eq!(sb.check_code(code).await.unwrap(), format, "{code}");
            let t = tool("typed", u32::try_from(i).unwrap() + 1, code);
            assert_eq!(run(&sb, &t, json!({ "x": 6, "y": 7 })).await.unwrap(), json!(42), "{code}");
        }
    }

    #[tokio::test]
    async fn syntax_errors_are_reported_with_line_and_column() {
        let sb = sandbox();
        let cases = [
            ("const a = 1;\nreturn a +;", 2, 11),
            ("const x: number = ;", 1, 19),
            ("export default async function (args) {\n  return args.;\n}", 2, 15),
            ("(args) => {\n  let a = 1;\n  let a = 2;\n}", 3, 7),
        ];
        for (code, line, column) in cases {
            let err = sb.check_code(code).await.unwrap_err();
            let SandboxError::CodeInvalid(invalid) = &err else { panic!("{code}: {err:?}") };
            assert_eq!(invalid.position, Some(SourcePosition { line, column }), "{code}: {err}");
            assert_eq!(err.kind(), ErrorKind::CodeInvalid);
            // Loading the same code for an invocation reports the same position.
            let err = run(&sb, &tool("broken", line * 100 + column, code), json!({})).await.unwrap_err();
            let SandboxError::CodeInvalid(at_load) = &err else { panic!("{code}: {err:?}") };
            assert_eq!(at_load.position, invalid.position, "{code}: {err}");
        }
        assert_healthy(&sb).await;
    }

    #[tokio::test]
    async fn checking_code_never_runs_it() {
        let sb = sandbox_with(|c| c.check_timeout = std::time::Duration::from_secs(5));
        let code = "while (true) {}\nexport default async function () { return 1; }";
        assert_eq!(sb.check_code(code).await.unwrap(), CodeFormat::Module);
        let err = sb.check_code("export const x = 1;").await.unwrap_err();
        assert!(err.to_string().contains("export default"), "{err}");
        let err =
            sb.check_code("import pad from 'npm:left-pad';\nexport default () => pad('a', 3);").await.unwrap_err();
        assert!(matches!(&err, SandboxError::CodeInvalid(c) if c.message.contains("npm")), "{err:?}");
    }
}

mod results_and_errors {
    use super::*;

    #[tokio::test]
    async fn thrown_errors_keep_name_message_and_tool_line_numbers() {
        let sb = sandbox();
        let t = tool("thrower", 1, "const a = 1;\n\nthrow new TypeError(`bad value ${a}`);");
        let err = run(&sb, &t, json!({})).await.unwrap_err();
        let SandboxError::User(e) = &err else { panic!("{err:?}") };
        assert_eq!((e.name.as_deref(), e.message.as_str()), (Some("TypeError"), "bad value 1"));
        let stack = e.stack.as_deref().unwrap_or_default();
        assert!(stack.contains("tool.ts:3:"), "{stack}");
        assert!(!stack.contains("data:"), "{stack}");
        assert_eq!(err.to_run_error().kind, ErrorKind::UserError);
    }

    #[tokio::test]
    async fn throwing_non_error_values_is_a_user_error() {
        let sb = sandbox();
        let cases = [
            ("throw 'boom'", "\"boom\""),
            ("throw 42", "42"),
            ("throw { code: 7 }", "code: 7"),
            ("throw null", "null"),
            ("throw undefined", "undefined"),
            ("return Promise.reject(Symbol('s'))", "Symbol(s)"),
        ];
        for (i, (code, shown)) in cases.into_iter().enumerate() {
            let err = run(&sb, &tool("nonerror", u32::try_from(i).unwrap(), code), json!({})).await.unwrap_err();
            let SandboxError::User(e) = &err else { panic!("{code}: {err:?}") };
            assert!(e.message.contains("non-Error") && e.message.contains(shown), "{code}: {}", e.message);
        }
        assert_healthy(&sb).await;
    }

    #[tokio::test]
    async fn results_must_be_json_with_documented_conversions() {
        let sb = sandbox();
        let ok = [
            ("return undefined", json!(null)),
            ("return { a: undefined, b: [undefined], c: NaN }", json!({ "b": [null], "c": null })),
            ("return new Date(0)", json!("1970-01-01T00:00:00.000Z")),
            ("return { toJSON() { return 'custom'; } }", json!("custom")),
        ];
        for (i, (code, want)) in ok.into_iter().enumerate() {
            assert_eq!(run(&sb, &tool("convert", u32::try_from(i).unwrap(), code), json!({})).await.unwrap(), want);
        }
        let bad = [
            ("return { n: 10n }", "$.n is a BigInt"),
            ("const a = { list: [] }; a.list.push(a); return a", "$.list[0] is a circular reference (back to $)"),
            ("return { f: () => 1 }", "$.f is a function"),
            ("return () => 1", "$ is a function"),
            ("return { m: new Map() }", "$.m is a Map"),
            ("return Symbol('x')", "$ is a Symbol"),
        ];
        for (i, (code, reason)) in bad.into_iter().enumerate() {
            let err = run(&sb, &tool("invalid", u32::try_from(i).unwrap(), code), json!({})).await.unwrap_err();
            assert!(matches!(&err, SandboxError::InvalidOutput(m) if m.contains(reason)), "{code}: {err:?}");
            assert_eq!(err.kind(), ErrorKind::InvalidOutput);
        }
    }

    #[tokio::test]
    async fn output_over_the_limit_is_invalid_output() {
        let sb = sandbox();
        let t = tool_with("big", 1, "return 'x'.repeat(2000)", |t| t.limits.max_output_bytes = 1000);
        let err = run(&sb, &t, json!({})).await.unwrap_err();
        assert!(matches!(&err, SandboxError::InvalidOutput(m) if m.contains("1000 bytes")), "{err:?}");
        let t = tool_with("big", 2, "return 'é'.repeat(600)", |t| t.limits.max_output_bytes = 1000);
        assert!(matches!(run(&sb, &t, json!({})).await, Err(SandboxError::InvalidOutput(_))));
    }
}

mod context {
    use super::*;

    #[tokio::test]
    async fn logs_and_progress_are_delivered_as_events() {
        let sb = sandbox();
        let code = "console.log('hello', { n: 1 });\nctx.log('warn', 'careful');\nconsole.error('bad');\nctx.progress(1, 2, 'half');\nreturn 'ok';";
        let (result, events) = run_with_events(&sb, Invocation::new(tool("logger", 1, code), json!({}))).await;
        assert_eq!(result.unwrap().value, json!("ok"));
        assert_eq!(
            events,
            vec![
                SandboxEvent::Log { level: LogLevel::Info, message: "hello { n: 1 }".into() },
                SandboxEvent::Log { level: LogLevel::Warn, message: "careful".into() },
                SandboxEvent::Log { level: LogLevel::Error, message: "bad".into() },
                SandboxEvent::Progress { done: 1.0, total: Some(2.0), message: Some("half".into()) },
            ]
        );
    }

    #[tokio::test]
    async fn logs_are_capped() {
        let sb = sandbox_with(|c| c.max_log_bytes = 1000);
        let code = "for (let i = 0; i < 100; i++) console.log('line ' + i + ' ' + 'x'.repeat(50));\nreturn 'done';";
        let (result, events) = run_with_events(&sb, Invocation::new(tool("chatty", 1, code), json!({}))).await;
        let out = result.unwrap();
        assert!(out.stats.logs_truncated);
        let bytes: usize = events
            .iter()
            .map(|e| match e {
                SandboxEvent::Log { message, .. } => message.len(),
                _ => 0,
            })
            .sum();
        assert!(bytes <= 1000, "{bytes} bytes of logs");
        assert_eq!(events.last(), Some(&SandboxEvent::LogsTruncated { limit_bytes: 1000 }));
    }

    #[tokio::test]
    async fn cancel_aborts_the_signal_and_a_tool_that_stops_keeps_its_process() {
        let sb = sandbox();
        let code = "console.log('started');\nawait new Promise((resolve) => ctx.signal.addEventListener('abort', resolve));\nreturn ctx.signal.reason.name;";
        let t = tool("waiter", 1, code);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut inv = Invocation::new(Arc::clone(&t), json!({}));
        inv.events = Some(tx);
        let cancel = inv.cancel.clone();
        let running = tokio::spawn({
            let sb = sb.clone();
            async move { sb.invoke(inv).await }
        });
        assert!(matches!(rx.recv().await, Some(SandboxEvent::Log { message, .. }) if message == "started"));
        cancel.cancel();
        let err = running.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Cancelled);
        let stats = sb.pool_stats();
        assert_eq!((stats.processes, stats.idle), (1, 1), "the cooperative tool's process stays warm: {stats:?}");
    }

    #[tokio::test]
    async fn timeout_aborts_the_signal_first() {
        let sb = sandbox();
        let code = "await new Promise((resolve) => ctx.signal.addEventListener('abort', resolve));\nreturn 'stopped';";
        let t = tool_with("slow", 1, code, |t| t.limits.timeout_ms = 200);
        let first = invoke(&sb, &t, json!({})).await.unwrap_err();
        assert!(matches!(first, SandboxError::Timeout { timeout_ms: 200 }), "{first:?}");
        assert_eq!(sb.pool_stats().idle, 1, "a tool that honours ctx.signal keeps its process");
    }

    #[derive(Debug, Default)]
    struct Host {
        calls: AtomicUsize,
    }

    #[async_trait]
    impl HostCalls for Host {
        async fn call(&self, method: &str, params: Value) -> Result<Value, String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match method {
                "tools.call" => Ok(json!({ "called": params["name"], "with": params["args"] })),
                "step.lookup" if params["key"] == "cached" => Ok(json!({ "found": true, "value": "from log" })),
                "step.lookup" => Ok(json!({ "found": false })),
                "step.record" => Ok(Value::Null),
                other => Err(format!("unknown host method {other}")),
            }
        }
    }

    #[tokio::test]
    async fn host_calls_reach_the_worker_over_the_same_channel() {
        let sb = sandbox();
        let code = "const r = await ctx.tools.call('other', { q: 1 });\nconst a = await ctx.step('cached', () => 'recomputed');\nconst b = await ctx.step('fresh', async () => 'computed');\nreturn { r, a, b };";
        let host = Arc::new(Host::default());
        let mut inv = Invocation::new(tool("caller", 1, code), json!({}));
        inv.host = Some(host.clone());
        let value = sb.invoke(inv).await.unwrap().value;
        assert_eq!(value, json!({ "r": { "called": "other", "with": { "q": 1 } }, "a": "from log", "b": "computed" }));
        assert_eq!(host.calls.load(Ordering::SeqCst), 4);

        let err = run(&sb, &tool("caller", 1, code), json!({})).await.unwrap_err();
        assert!(matches!(&err, SandboxError::User(e) if e.message.contains("host calls are not available")), "{err:?}");
    }
}

mod hostile {
    use super::*;

    async fn denied(code: &str, permission: Permission) {
        let sb = sandbox();
        let err = run(&sb, &tool("hostile", 1, code), json!({})).await.expect_err(code);
        assert!(
            matches!(&err, SandboxError::PermissionDenied { permission: p, .. } if *p == permission),
            "{code}: {err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        assert!(!err.to_string().contains("root:"), "{err}");
        assert_healthy(&sb).await;
    }

    #[tokio::test]
    async fn reading_a_file_is_denied() {
        denied("return Deno.readTextFileSync('/etc/passwd')", Permission::Read).await;
        denied("return (await import('node:fs')).readFileSync('/etc/passwd', 'utf8')", Permission::Read).await;
        denied("return await (await fetch('file:///etc/passwd')).text()", Permission::Read).await;
    }

    /// Deno does not check read permission for local imports; the import map blocks them.
    #[tokio::test]
    async fn importing_a_local_file_as_text_is_denied() {
        denied("return (await import('/etc/passwd', { with: { type: 'text' } })).default", Permission::Read).await;
        denied("return (await import('file:///etc/hostname')).default", Permission::Read).await;
    }

    #[tokio::test]
    async fn writing_a_file_is_denied() {
        denied("await Deno.writeTextFile('/tmp/kiln-hostile', 'x'); return 1", Permission::Write).await;
    }

    #[tokio::test]
    async fn running_a_command_is_denied() {
        denied("return new Deno.Command('/bin/sh', { args: ['-c', 'id'] }).outputSync().code", Permission::Run).await;
    }

    #[tokio::test]
    async fn reading_the_environment_is_denied() {
        denied("return Deno.env.toObject()", Permission::Env).await;
        denied("return Deno.env.get('HOME')", Permission::Env).await;
    }

    #[tokio::test]
    async fn loading_native_code_is_denied() {
        denied("return Deno.dlopen('libc.so.6', { getpid: { parameters: [], result: 'i32' } })", Permission::Ffi).await;
    }

    #[tokio::test]
    async fn system_information_is_denied() {
        denied("return Deno.hostname()", Permission::Sys).await;
    }

    #[tokio::test]
    async fn spawning_a_worker_is_denied() {
        denied(
            "new Worker('data:application/javascript,postMessage(1)', { type: 'module' }); return 1",
            Permission::Worker,
        )
        .await;
        denied(
            "const { Worker } = await import('node:worker_threads');\nnew Worker('1', { eval: true }); return 1",
            Permission::Worker,
        )
        .await;
    }

    #[tokio::test]
    async fn persistent_web_storage_is_denied() {
        denied("localStorage.setItem('k', 'v'); return 1", Permission::Storage).await;
    }

    #[tokio::test]
    async fn only_declared_hosts_within_the_policy_are_reachable() {
        let port = json_server(r#"{"ok": true}"#).await;
        let other = json_server(r#"{"ok": "other"}"#).await;
        let allowed = format!("127.0.0.1:{port}");
        let sb = sandbox_with(|c| c.policy.network = NetPolicy::AllowList(hosts(&[&allowed, "localhost"])));
        let fetch = |p: u16| format!("return await (await fetch('http://127.0.0.1:{p}/')).json()");
        let declared = |t: &mut kiln_worker::ToolVersion| t.permissions.network = hosts(&[&allowed]);

        assert_eq!(
            run(&sb, &tool_with("net", 1, &fetch(port), declared), json!({})).await.unwrap(),
            json!({"ok": true})
        );
        let err = run(&sb, &tool_with("net", 2, &fetch(other), declared), json!({})).await.unwrap_err();
        assert!(matches!(&err, SandboxError::PermissionDenied { permission: Permission::Net, .. }), "{err:?}");
        // Declared by the tool but outside the server's allow-list.
        let t = tool_with("net", 3, &fetch(other), |t| t.permissions.network = hosts(&[&format!("127.0.0.1:{other}")]));
        let err = run(&sb, &t, json!({})).await.unwrap_err();
        assert!(matches!(&err, SandboxError::PermissionDenied { permission: Permission::Net, .. }), "{err:?}");
        let err = run(&sb, &tool("net", 4, "return (await fetch('http://example.com/')).status"), json!({})).await;
        assert!(matches!(&err, Err(SandboxError::PermissionDenied { permission: Permission::Net, .. })), "{err:?}");
        assert_healthy(&sb).await;
    }

    #[tokio::test]
    async fn an_infinite_loop_times_out_and_its_process_is_replaced() {
        let sb = sandbox();
        let t = tool_with("spin", 1, "while (true) {}", |t| t.limits.timeout_ms = 300);
        let err = run(&sb, &t, json!({})).await.unwrap_err();
        assert!(matches!(err, SandboxError::Timeout { timeout_ms: 300 }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert_eq!(sb.pool_stats().processes, 0, "the spinning process was killed");
        assert_healthy(&sb).await;
    }

    #[tokio::test]
    async fn a_tool_that_ignores_the_abort_is_killed_after_the_grace_period() {
        let sb = sandbox();
        let t = tool_with("stubborn", 1, "await new Promise(() => {})", |t| t.limits.timeout_ms = 200);
        let err = run(&sb, &t, json!({})).await.unwrap_err();
        assert!(matches!(err, SandboxError::Timeout { timeout_ms: 200 }), "{err:?}");
        assert_eq!(sb.pool_stats().processes, 0);
        assert_healthy(&sb).await;
    }

    #[tokio::test]
    async fn module_top_level_code_that_never_finishes_loading_is_stopped() {
        let sb = sandbox_with(|c| c.load_timeout = std::time::Duration::from_millis(500));
        let t = tool("stuck", 1, "while (true) {}\nexport default async function () { return 1; }");
        let err = run(&sb, &t, json!({})).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
        assert_eq!(sb.pool_stats().processes, 0);
        assert_healthy(&sb).await;
    }

    #[tokio::test]
    async fn allocating_until_out_of_memory_kills_only_that_process() {
        let sb = sandbox();
        let code = "const keep = [];\nwhile (true) keep.push(new Array(100000).fill(Math.random()));";
        let t = tool_with("hog", 1, code, |t| t.limits.memory_mb = 64);
        let err = run(&sb, &t, json!({})).await.unwrap_err();
        assert!(matches!(err, SandboxError::Oom { memory_mb: 64 }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Oom);
        assert_healthy(&sb).await;
        // The same tool gets a fresh process next time.
        let t2 = tool_with("hog", 1, code, |t| t.limits.memory_mb = 64);
        assert!(matches!(run(&sb, &t2, json!({})).await, Err(SandboxError::Oom { .. })));
    }

    #[tokio::test]
    async fn printing_100_mb_neither_breaks_the_protocol_nor_floods_the_host() {
        let sb = sandbox_with(|c| c.max_log_bytes = 10_000);
        let code = "const mb = 'x'.repeat(1 << 20);\nconst process = (await import('node:process')).default;\nfor (let i = 0; i < 50; i++) console.log(mb);\nfor (let i = 0; i < 25; i++) Deno.stdout.writeSync(new TextEncoder().encode(mb));\nfor (let i = 0; i < 25; i++) process.stdout.write(mb + '\\n');\nconst w = Deno.stdout.writable.getWriter();\nawait w.write(new TextEncoder().encode(mb));\nreturn 'still framed';";
        let (result, events) = run_with_events(&sb, Invocation::new(tool("printer", 1, code), json!({}))).await;
        let out = result.unwrap();
        assert_eq!(out.value, json!("still framed"));
        assert!(out.stats.logs_truncated);
        let logged: usize = events
            .iter()
            .map(|e| match e {
                SandboxEvent::Log { message, .. } => message.len(),
                _ => 0,
            })
            .sum();
        assert!(logged <= 10_000, "{logged} bytes of logs reached the host");
        assert_healthy(&sb).await;
    }

    #[tokio::test]
    async fn returning_100_mb_is_invalid_output() {
        let sb = sandbox();
        let t = tool_with("hoard", 1, "return { data: 'x'.repeat(100 * 1024 * 1024) }", |t| t.limits.memory_mb = 512);
        let err = run(&sb, &t, json!({})).await.unwrap_err();
        assert!(matches!(&err, SandboxError::InvalidOutput(m) if m.contains("limit")), "{err:?}");
        assert_healthy(&sb).await;
    }

    /// Two tools never share a process, so polluting built-in prototypes cannot leak across.
    #[tokio::test]
    async fn prototype_pollution_does_not_cross_tools() {
        let sb = sandbox();
        let polluter = tool(
            "polluter",
            1,
            "Object.prototype.polluted = 'yes'; Array.prototype.map = () => 'hijacked'; globalThis.secret = 's3cret'; return Deno.pid",
        );
        let victim = tool(
            "victim",
            1,
            "return { polluted: ({}).polluted ?? null, map: [1].map((x) => x + 1), secret: globalThis.secret ?? null, pid: Deno.pid }",
        );
        let polluter_pid = run(&sb, &polluter, json!({})).await.unwrap();
        let seen = run(&sb, &victim, json!({})).await.unwrap();
        assert_eq!(seen["polluted"], Value::Null);
        assert_eq!(seen["map"], json!([2]));
        assert_eq!(seen["secret"], Value::Null);
        assert_ne!(seen["pid"], polluter_pid);
    }

    #[tokio::test]
    async fn exiting_the_process_is_contained() {
        let sb = sandbox();
        let err = run(&sb, &tool("quitter", 1, "Deno.exit(0)"), json!({})).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UserError, "{err:?}");
        let code = "(await import('node:process')).default.exit(3)";
        let err = run(&sb, &tool("quitter", 2, code), json!({})).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UserError, "{err:?}");
        // A process may still signal itself; that is a crash of its own process only.
        let err = run(&sb, &tool("quitter", 3, "Deno.kill(Deno.pid, 'SIGKILL')"), json!({})).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::SandboxCrash, "{err:?}");
        // So is writing a forged, malformed frame to the real stdout.
        let code =
            "(await import('node:process')).default.stdout.write('\\x1e{not json\\n'); await new Promise(() => {})";
        let err = run(&sb, &tool("quitter", 4, code), json!({})).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::SandboxCrash, "{err:?}");
        assert_healthy(&sb).await;
    }
}

mod pool {
    use super::*;

    #[tokio::test]
    async fn a_warm_process_serves_the_next_invocation() {
        let sb = sandbox();
        let t = tool("counter", 1, "globalThis.n = (globalThis.n ?? 0) + 1; return globalThis.n");
        let first = invoke(&sb, &t, json!({})).await.unwrap();
        let second = invoke(&sb, &t, json!({})).await.unwrap();
        assert!(first.stats.cold_start && !second.stats.cold_start);
        assert_eq!(first.stats.process_id, second.stats.process_id);
        assert_eq!((first.value, second.value), (json!(1), json!(2)));
    }

    #[tokio::test]
    async fn a_cancelled_caller_stops_waiting_for_a_busy_pool() {
        let sb = sandbox_with(|c| c.pool.max_per_tool = 1);
        let code = "console.log('started');\nawait new Promise((resolve) => ctx.signal.addEventListener('abort', resolve));\nreturn 1;";
        let t = tool("single", 1, code);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut first = Invocation::new(Arc::clone(&t), json!({}));
        first.events = Some(tx);
        let first_cancel = first.cancel.clone();
        let running = tokio::spawn({
            let sb = sb.clone();
            async move { sb.invoke(first).await }
        });
        assert!(matches!(rx.recv().await, Some(SandboxEvent::Log { .. })));
        let second = Invocation::new(Arc::clone(&t), json!({}));
        second.cancel.cancel();
        assert_eq!(sb.invoke(second).await.unwrap_err().kind(), ErrorKind::Cancelled);
        first_cancel.cancel();
        assert_eq!(running.await.unwrap().unwrap_err().kind(), ErrorKind::Cancelled);
        assert_eq!(sb.pool_stats().busy, 0);
    }

    #[tokio::test]
    async fn processes_are_recycled_after_n_invocations() {
        let sb = sandbox_with(|c| c.pool.recycle_after = 3);
        let t = tool("worn", 1, "return Deno.pid");
        let mut pids = Vec::new();
        for _ in 0..7 {
            pids.push(run(&sb, &t, json!({})).await.unwrap());
        }
        assert!(pids[0] == pids[2] && pids[2] != pids[3] && pids[3] == pids[5] && pids[5] != pids[6], "{pids:?}");
        assert_eq!(sb.pool_stats().recycled, 2);
    }

    #[tokio::test]
    async fn processes_are_recycled_when_memory_grows() {
        let sb = sandbox_with(|c| {
            c.pool.recycle_rss_growth_mb = 32;
            c.pool.rss_check_every = 1;
        });
        let code = "globalThis.keep ??= [];\nglobalThis.keep.push(new Uint8Array(64 << 20).fill(1));\nreturn Deno.pid";
        let t = tool("leaky", 1, code);
        let first = run(&sb, &t, json!({})).await.unwrap();
        let second = run(&sb, &t, json!({})).await.unwrap();
        assert_ne!(first, second);
        assert_eq!(sb.pool_stats().recycled, 2);
    }

    #[tokio::test]
    async fn idle_processes_are_stopped() {
        let sb = sandbox_with(|c| c.pool.idle_timeout = std::time::Duration::from_millis(100));
        run(&sb, &tool("sleepy", 1, "return 1"), json!({})).await.unwrap();
        eventually("the idle process is stopped", || sb.pool_stats().idle_stopped == 1).await;
        assert_eq!(sb.pool_stats().processes, 0);
        assert_healthy(&sb).await;
    }

    #[tokio::test]
    async fn limits_hold_with_many_concurrent_invocations_across_tools() {
        let sb = sandbox();
        let tools: Vec<_> = (0..5)
            .map(|i| tool(&format!("tool{i}"), 1, &format!("(args) => ({{ tool: {i}, n: args.n, pid: Deno.pid }})")))
            .collect();
        let mut running = tokio::task::JoinSet::new();
        for n in 0..200u64 {
            let (sb, t) = (sb.clone(), Arc::clone(&tools[(n % 5) as usize]));
            running.spawn(async move { (n, run(&sb, &t, json!({ "n": n })).await) });
        }
        let mut pids = std::collections::HashSet::new();
        while let Some(done) = running.join_next().await {
            let (n, result) = done.unwrap();
            let value = result.unwrap();
            assert_eq!((value["tool"].as_u64(), value["n"].as_u64()), (Some(n % 5), Some(n)));
            pids.insert(value["pid"].as_u64());
        }
        let stats = sb.pool_stats();
        assert!(stats.processes <= 4 && stats.busy == 0, "{stats:?}");
        assert!(stats.spawned >= 5 && stats.evicted > 0, "{stats:?}");
        assert!(pids.len() >= 5);
    }

    #[tokio::test]
    async fn a_new_version_of_a_tool_replaces_idle_old_versions() {
        let sb = sandbox_with(|c| c.pool.max_per_tool = 1);
        for version in 1..=3 {
            let t = tool("evolving", version, &format!("return {version}"));
            assert_eq!(run(&sb, &t, json!({})).await.unwrap(), json!(version));
        }
        let stats = sb.pool_stats();
        assert_eq!((stats.processes, stats.evicted), (1, 2), "{stats:?}");
    }
}
