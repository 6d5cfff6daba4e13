//! What a tool's process may do, as `deno run` flags: everything denied, network limited to the
//! tool's declared hosts within the server policy, imports limited to what the policy allows.

use std::ffi::OsString;
use std::sync::LazyLock;

use kiln_proto::tool::NetHost;

use super::config::{NetPolicy, SandboxPolicy};
use super::protocol::{WORKER_THREADS_STUB, base64};

/// A tool's declared hosts split by the server policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetGrants {
    /// Passed to `--allow-net`. Sorted, deduplicated.
    pub granted: Vec<NetHost>,
    /// Declared by the tool, refused by the policy (the tool gets `permission_denied` if it
    /// tries). Worth a warning when the tool is created.
    pub refused: Vec<NetHost>,
}

/// Intersects the hosts a tool declares with the server's allow-list. A declared host without a
/// port inside an allowed `host:port` is narrowed to that port.
pub fn grant_network(declared: &[NetHost], policy: &NetPolicy) -> NetGrants {
    let mut grants = NetGrants::default();
    for host in declared {
        match policy {
            NetPolicy::Unrestricted => grants.granted.push(host.clone()),
            NetPolicy::AllowList(allowed) => {
                let before = grants.granted.len();
                for a in allowed {
                    if host.is_within(a) {
                        grants.granted.push(host.clone());
                    } else if a.is_within(host) {
                        grants.granted.push(a.clone());
                    }
                }
                if grants.granted.len() == before {
                    grants.refused.push(host.clone());
                }
            }
        }
    }
    grants.granted.sort();
    grants.granted.dedup();
    grants
}

/// The per-process settings that decide which warm process can serve an invocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ProcessSpec {
    pub net: Vec<NetHost>,
    pub memory_mb: u32,
}

/// The import map every process runs with, as a `data:` URL.
///
/// - Every `file:` specifier is unresolvable: Deno loads local modules (and
///   `with { type: "text" }` imports) without a read permission check, so without this a tool
///   could `import("/etc/passwd", { with: { type: "text" } })`. The bridge and tool code are
///   `data:` URLs and need no file access.
/// - `node:worker_threads` is a stand-in whose `Worker` throws `NotCapable` (the bridge replaces
///   the global `Worker` the same way).
static IMPORT_MAP: LazyLock<String> = LazyLock::new(|| {
    let stub = format!("data:application/javascript;base64,{}", base64(WORKER_THREADS_STUB.as_bytes()));
    let map = serde_json::json!({
        "imports": { "file:///": null, "node:worker_threads": stub, "worker_threads": stub }
    });
    format!("data:application/json;base64,{}", base64(map.to_string().as_bytes()))
});

/// `deno run` flags (before the main module) for a process with `spec` under `policy`.
pub(crate) fn deno_run_args(spec: &ProcessSpec, policy: &SandboxPolicy) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "run",
        "--quiet",
        "--no-config",
        "--no-lock",
        "--no-prompt",
        "--deny-read",
        "--deny-write",
        "--deny-run",
        "--deny-ffi",
        "--deny-env",
        "--deny-sys",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    if spec.net.is_empty() {
        args.push("--deny-net".into());
    } else {
        let hosts: Vec<&str> = spec.net.iter().map(NetHost::as_str).collect();
        args.push(format!("--allow-net={}", hosts.join(",")).into());
    }
    if !policy.allow_npm {
        args.push("--no-npm".into());
    }
    if policy.allow_jsr {
        args.push("--allow-import=jsr.io:443".into());
    } else {
        args.push("--no-remote".into());
    }
    args.push(format!("--import-map={}", *IMPORT_MAP).into());
    args.push(format!("--v8-flags=--max-old-space-size={}", spec.memory_mb).into());
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &[&str]) -> Vec<NetHost> {
        list.iter().map(|h| NetHost::parse(h).unwrap()).collect()
    }

    #[test]
    fn unrestricted_policy_grants_what_is_declared() {
        let g = grant_network(&hosts(&["b.com", "a.com:443"]), &NetPolicy::Unrestricted);
        assert_eq!(g.granted, hosts(&["a.com:443", "b.com"]));
        assert!(g.refused.is_empty());
    }

    #[test]
    fn allow_list_intersects_and_narrows_ports() {
        let policy = NetPolicy::AllowList(hosts(&["a.com", "b.com:443", "127.0.0.1:8080"]));
        let g = grant_network(&hosts(&["a.com:80", "b.com", "c.com", "127.0.0.1:9090"]), &policy);
        assert_eq!(g.granted, hosts(&["a.com:80", "b.com:443"]));
        assert_eq!(g.refused, hosts(&["c.com", "127.0.0.1:9090"]));
    }

    #[test]
    fn flags_deny_everything_but_granted_hosts() {
        let spec = ProcessSpec { net: vec![], memory_mb: 64 };
        let args: Vec<String> =
            deno_run_args(&spec, &SandboxPolicy::default()).into_iter().map(|a| a.into_string().unwrap()).collect();
        for flag in
            ["--deny-read", "--deny-write", "--deny-run", "--deny-ffi", "--deny-env", "--deny-sys", "--deny-net"]
        {
            assert!(args.iter().any(|a| a == flag), "{flag} missing from {args:?}");
        }
        assert!(args.iter().any(|a| a == "--no-npm") && args.iter().any(|a| a == "--no-remote"));
        assert!(args.iter().any(|a| a == "--v8-flags=--max-old-space-size=64"));

        let spec = ProcessSpec { net: hosts(&["a.com", "127.0.0.1:1"]), memory_mb: 64 };
        let policy = SandboxPolicy { allow_npm: true, allow_jsr: true, ..SandboxPolicy::default() };
        let args: Vec<String> = deno_run_args(&spec, &policy).into_iter().map(|a| a.into_string().unwrap()).collect();
        assert!(args.iter().any(|a| a == "--allow-net=a.com,127.0.0.1:1"), "{args:?}");
        assert!(!args.iter().any(|a| a == "--deny-net" || a == "--no-npm" || a == "--no-remote"), "{args:?}");
    }
}
