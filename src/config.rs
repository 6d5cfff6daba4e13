//! Kiln's one typed configuration, layered: built-in defaults, then `kiln.toml` (or `--config`),
//! then `KILN_*` environment variables (`__` separates sections: `KILN_STORE__MAX_CONNECTIONS`),
//! then command-line flags. The result is validated before anything starts, and `kiln config`
//! prints it with secrets hidden.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use kiln_proto::tool::NetHost;
use kiln_worker::sandbox::{DenoBinary, NetPolicy, PoolConfig, SandboxConfig, SandboxPolicy};
use serde::{Deserialize, Serialize};

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `sqlite://PATH` (the embedded default) or `postgres://USER:PASSWORD@HOST/DB`.
    pub database_url: String,
    /// Address of the HTTP API. Loopback only until authentication is configured.
    pub listen: SocketAddr,
    /// Path of the `deno` binary; default: the project's install, then PATH.
    pub deno: Option<PathBuf>,
    pub log: LogConfig,
    pub store: StoreConfig,
    pub projections: ProjectionsConfig,
    pub sandbox: SandboxSettings,
    pub mcp: McpConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub worker: WorkerSettings,
}

/// The MCP endpoint (`/mcp` over Streamable HTTP, and `kiln mcp --stdio`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// How long `tools/call` waits for a run before answering with a run handle.
    pub call_budget_ms: u64,
    /// `Host` headers accepted (DNS rebinding protection): host names or `host:port`.
    pub allowed_hosts: Vec<String>,
    /// Browser `Origin`s accepted (`scheme://host:port`, `:*` for any port); others get 403.
    pub allowed_origins: Vec<String>,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
}

impl Default for McpConfig {
    fn default() -> Self {
        let d = kiln_api::McpSettings::default();
        Self {
            call_budget_ms: d.call_budget.as_millis() as u64,
            allowed_hosts: d.allowed_hosts,
            allowed_origins: d.allowed_origins,
            max_body_bytes: d.max_body_bytes,
        }
    }
}

/// Authentication of MCP requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Require a bearer credential (an API key from `kiln keys create`) on every MCP request.
    /// Needed to listen beyond loopback.
    pub required: bool,
    /// The URL clients reach this server's MCP endpoint at, for the protected-resource metadata
    /// (default: derived from the request's Host header).
    pub resource_url: Option<String>,
    /// OAuth authorization servers to name in the protected-resource metadata.
    pub authorization_servers: Vec<String>,
    /// Also accept JWT bearer tokens from an identity provider.
    pub jwt: Option<JwtConfig>,
}

/// JWT bearer tokens: checked against a JWKS (a file, re-read when it changes, or the identity
/// provider's URL, fetched over HTTPS), issuer, audience.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The identity provider's JWK set, as a file (replace it to rotate keys).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The identity provider's JWK set URL (`https://`; `http://` only to a loopback address).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Extra CA certificates (PEM) trusted for `jwks_url`, besides the public web roots.
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// How often `jwks_url` is fetched again (also at once, at most every 10 s, when a token
    /// names a key the set lacks).
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_secs: u64,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (this resource).
    pub audience: String,
    /// The claim listing the hosts the caller's tools may reach (absent: none).
    #[serde(default = "default_hosts_claim")]
    pub hosts_claim: String,
    /// Clock skew tolerated on `exp`/`nbf`.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
}

fn default_hosts_claim() -> String {
    "kiln_hosts".to_owned()
}

fn default_leeway() -> u64 {
    30
}

fn default_jwks_refresh() -> u64 {
    3600
}

/// Per-actor request limits, kept in the database: every API replica on it shares each actor's
/// budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Sustained MCP requests per second per actor (0: unlimited).
    pub requests_per_second: f64,
    /// Requests an actor may make at once above the sustained rate.
    pub burst: u32,
    /// MCP requests of one actor in flight at once (0: unlimited).
    pub max_concurrent: u32,
    /// How long a request's slot counts when its replica dies without giving it back; must be
    /// longer than `mcp.call_budget_ms`.
    pub slot_lease_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = kiln_api::LimitSettings::default();
        Self {
            requests_per_second: d.requests_per_second,
            burst: d.burst,
            max_concurrent: d.max_concurrent,
            slot_lease_secs: d.slot_lease.as_secs(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter, e.g. `info` or `kiln=debug,sqlx=warn`. `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub max_connections: u32,
    /// SQLite: `normal` (WAL, durable across process crashes) or `full` (fsync every commit).
    pub sqlite_sync: String,
    pub busy_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectionsConfig {
    /// Events applied per transaction.
    pub batch_size: usize,
}

/// The tool sandbox: the server-wide policy every tool's permissions are intersected with, and
/// the warm process pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxSettings {
    /// Hosts any tool may reach at most (`host` or `host:port`). Unset: a tool gets exactly the
    /// hosts it declares.
    pub network_allow: Option<Vec<String>>,
    /// Allow `npm:` imports in tool code.
    pub allow_npm: bool,
    /// Allow `jsr:` imports in tool code.
    pub allow_jsr: bool,
    /// Deno's cache for transpiled code and packages; default: a private temporary folder.
    pub deno_dir: Option<PathBuf>,
    pub max_processes: usize,
    pub max_per_tool: usize,
    pub idle_timeout_ms: u64,
    /// Replace a process after this many invocations.
    pub recycle_after: u64,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        let pool = kiln_worker::sandbox::PoolConfig::default();
        Self {
            network_allow: None,
            allow_npm: false,
            allow_jsr: false,
            deno_dir: None,
            max_processes: pool.max_processes,
            max_per_tool: pool.max_per_tool,
            idle_timeout_ms: pool.idle_timeout.as_millis() as u64,
            recycle_after: pool.recycle_after,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: "sqlite://./.kiln/kiln.db".to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8788)),
            deno: None,
            log: LogConfig::default(),
            store: StoreConfig::default(),
            projections: ProjectionsConfig::default(),
            sandbox: SandboxSettings::default(),
            mcp: McpConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            worker: WorkerSettings::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".to_owned(), format: "text".to_owned() }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { max_connections: 8, sqlite_sync: "normal".to_owned(), busy_timeout_ms: 10_000 }
    }
}

impl Default for ProjectionsConfig {
    fn default() -> Self {
        Self { batch_size: 1_000 }
    }
}

/// Values given on the command line; unset flags leave lower layers alone.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlagOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

/// Top-level keys: `KILN_*` variables outside these (say `KILN_TEST_PG_URL`) are not config.
/// This machine's name, for naming workers (`unknown` if it cannot be read).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Queue workers: in `kiln worker`, and inside `kiln serve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Runs executed at once per worker process (`kiln serve`: 0 runs no worker in-process).
    pub concurrency: usize,
    pub heartbeat_interval_ms: u64,
    /// A worker silent this many heartbeats is presumed dead: its runs move to other workers.
    pub missed_heartbeats: usize,
    /// Backstop poll for jobs when no wakeup arrives.
    pub poll_interval_ms: u64,
    /// After SIGTERM, how long running runs may take to finish before they are handed back.
    pub drain_timeout_ms: u64,
    /// How often to re-queue runs that are neither ended nor queued.
    pub reconcile_interval_ms: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        let w = kiln_worker::queue::WorkerConfig::default();
        Self {
            concurrency: w.concurrency,
            heartbeat_interval_ms: w.heartbeat_interval.as_millis() as u64,
            missed_heartbeats: w.missed_heartbeats,
            poll_interval_ms: w.poll_interval.as_millis() as u64,
            drain_timeout_ms: w.drain_timeout.as_millis() as u64,
            reconcile_interval_ms: w.reconcile_interval.as_millis() as u64,
        }
    }
}

const SECTIONS: &[&str] =
    &["database_url", "listen", "deno", "log", "store", "projections", "sandbox", "worker", "mcp", "auth", "limits"];

impl Config {
    /// Loads the layers. `file`: an explicit config file (must exist); otherwise `./kiln.toml`
    /// if present.
    pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                if !path.is_file() {
                    bail!("config file {} does not exist", path.display());
                }
                figment = figment.merge(Toml::file_exact(path));
            }
            None if Path::new("kiln.toml").is_file() => figment = figment.merge(Toml::file_exact("kiln.toml")),
            None => {}
        }
        let env = Env::prefixed("KILN_").split("__").filter(|key| {
            // Depending on the order of `split` and `filter`, sections arrive as `a.b` or `a__b`.
            let top = key.as_str().split(['.', '_']).next().unwrap_or_default();
            let top = if top.eq_ignore_ascii_case("database") { "database_url" } else { top };
            SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(top))
        });
        let config: Config = figment
            .merge(env)
            .merge(Serialized::defaults(flags))
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        kiln_store::Backend::of_url(&self.database_url).context("database_url")?;
        if !self.listen.ip().is_loopback() && !self.auth.required {
            bail!(
                "listen: {} is not a loopback address; Kiln refuses to serve beyond this machine \
                 without authentication (bind 127.0.0.1 or [::1], or set auth.required = true and create \
                 API keys with `kiln keys create`)",
                self.listen
            );
        }
        if let Some(j) = &self.auth.jwt {
            if !self.auth.required {
                bail!("auth.jwt: set auth.required = true too (tokens are only checked when auth is required)");
            }
            if j.issuer.is_empty() || j.audience.is_empty() {
                bail!("auth.jwt: issuer and audience must not be empty");
            }
            match (&j.jwks_file, &j.jwks_url) {
                (Some(_), Some(_)) => bail!("auth.jwt: set jwks_file or jwks_url, not both"),
                (None, None) => bail!("auth.jwt: set jwks_file or jwks_url (the identity provider's JWK set)"),
                (Some(_), None) if j.jwks_ca_file.is_some() => {
                    bail!("auth.jwt.jwks_ca_file: only used with jwks_url")
                }
                _ => {}
            }
            if let Some(url) = &j.jwks_url {
                kiln_api::auth::jwks::check_url(url).map_err(|e| anyhow::anyhow!("auth.jwt.jwks_url: {e}"))?;
            }
            if j.jwks_refresh_secs < 10 {
                bail!("auth.jwt.jwks_refresh_secs: must be at least 10, got {}", j.jwks_refresh_secs);
            }
        }
        if self.mcp.call_budget_ms == 0 || self.mcp.call_budget_ms > 3_600_000 {
            bail!("mcp.call_budget_ms: must be between 1 and 3600000, got {}", self.mcp.call_budget_ms);
        }
        if self.mcp.max_body_bytes < 1024 {
            bail!("mcp.max_body_bytes: must be at least 1024, got {}", self.mcp.max_body_bytes);
        }
        if !self.limits.requests_per_second.is_finite() || self.limits.requests_per_second < 0.0 {
            bail!("limits.requests_per_second: must be a number >= 0, got {}", self.limits.requests_per_second);
        }
        if self.limits.requests_per_second > 0.0 && self.limits.burst == 0 {
            bail!("limits.burst: must be at least 1 when limits.requests_per_second is set");
        }
        if self.limits.slot_lease_secs.saturating_mul(1000) <= self.mcp.call_budget_ms {
            bail!(
                "limits.slot_lease_secs: must be longer than mcp.call_budget_ms ({} ms), got {} s",
                self.mcp.call_budget_ms,
                self.limits.slot_lease_secs
            );
        }
        for (i, origin) in self.mcp.allowed_origins.iter().enumerate() {
            if origin != "null" && !origin.contains("://") {
                bail!("mcp.allowed_origins[{i}]: {origin:?} needs a scheme, e.g. https://app.example.com:443");
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bail!("log.format: must be \"text\" or \"json\", got {:?}", self.log.format);
        }
        if !matches!(self.store.sqlite_sync.as_str(), "normal" | "full") {
            bail!("store.sqlite_sync: must be \"normal\" or \"full\", got {:?}", self.store.sqlite_sync);
        }
        if self.store.max_connections == 0 {
            bail!("store.max_connections: must be at least 1");
        }
        if !(1..=100_000).contains(&self.projections.batch_size) {
            bail!("projections.batch_size: must be between 1 and 100000, got {}", self.projections.batch_size);
        }
        let w = &self.worker;
        if w.heartbeat_interval_ms < 100 || w.missed_heartbeats == 0 {
            bail!("worker: heartbeat_interval_ms must be at least 100 and missed_heartbeats at least 1");
        }
        if w.heartbeat_interval_ms * (w.missed_heartbeats as u64) < 3_000 {
            bail!(
                "worker: heartbeat_interval_ms x missed_heartbeats must be at least 3000 ms (got {} ms): the \
                 queue compares heartbeats in whole seconds, so less would take runs from live workers",
                w.heartbeat_interval_ms * w.missed_heartbeats as u64
            );
        }
        if w.poll_interval_ms == 0 || w.reconcile_interval_ms < 1_000 {
            bail!("worker: poll_interval_ms must be at least 1 and reconcile_interval_ms at least 1000");
        }
        self.sandbox_policy()?;
        let s = &self.sandbox;
        if s.max_processes == 0 || s.max_per_tool == 0 || s.max_per_tool > s.max_processes {
            bail!(
                "sandbox: need 1 <= max_per_tool <= max_processes, got max_per_tool {} and max_processes {}",
                s.max_per_tool,
                s.max_processes
            );
        }
        Ok(())
    }

    /// The server-wide sandbox policy, with `network_allow` validated host by host.
    pub fn sandbox_policy(&self) -> anyhow::Result<SandboxPolicy> {
        let network = match &self.sandbox.network_allow {
            None => NetPolicy::Unrestricted,
            Some(hosts) => NetPolicy::AllowList(
                hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| NetHost::parse(h).with_context(|| format!("sandbox.network_allow[{i}]")))
                    .collect::<anyhow::Result<_>>()?,
            ),
        };
        Ok(SandboxPolicy { network, allow_npm: self.sandbox.allow_npm, allow_jsr: self.sandbox.allow_jsr })
    }

    /// The queue worker settings, for `concurrency` runs at once.
    pub fn worker_config(&self, concurrency: usize) -> kiln_worker::queue::WorkerConfig {
        let w = &self.worker;
        kiln_worker::queue::WorkerConfig {
            concurrency,
            heartbeat_interval: Duration::from_millis(w.heartbeat_interval_ms),
            missed_heartbeats: w.missed_heartbeats,
            poll_interval: Duration::from_millis(w.poll_interval_ms),
            drain_timeout: Duration::from_millis(w.drain_timeout_ms),
            reconcile_interval: Duration::from_millis(w.reconcile_interval_ms),
            name_prefix: format!("kiln-{}-{}", hostname(), std::process::id()),
        }
    }

    /// Finds the configured deno and checks its version, then assembles the sandbox settings.
    pub fn sandbox_config(&self) -> anyhow::Result<SandboxConfig> {
        let deno = DenoBinary::locate(self.deno.as_deref(), None)?;
        let s = &self.sandbox;
        let mut config = SandboxConfig::new(deno);
        config.policy = self.sandbox_policy()?;
        config.deno_dir = s.deno_dir.clone();
        config.pool = PoolConfig {
            max_processes: s.max_processes,
            max_per_tool: s.max_per_tool,
            idle_timeout: Duration::from_millis(s.idle_timeout_ms),
            recycle_after: s.recycle_after,
            ..PoolConfig::default()
        };
        Ok(config)
    }

    /// The API's settings.
    pub fn api_config(&self) -> kiln_api::ApiConfig {
        kiln_api::ApiConfig {
            listen: self.listen,
            mcp: kiln_api::McpSettings {
                call_budget: Duration::from_millis(self.mcp.call_budget_ms),
                allowed_hosts: self.mcp.allowed_hosts.clone(),
                allowed_origins: self.mcp.allowed_origins.clone(),
                max_body_bytes: self.mcp.max_body_bytes,
            },
            auth: kiln_api::AuthSettings {
                required: self.auth.required,
                resource_url: self.auth.resource_url.clone(),
                authorization_servers: self.auth.authorization_servers.clone(),
                jwt: self.auth.jwt.as_ref().map(|j| kiln_api::auth::jwt::JwtSettings {
                    jwks: match (&j.jwks_url, &j.jwks_file) {
                        (Some(url), _) => kiln_api::auth::jwks::JwksSource::Url {
                            url: url.clone(),
                            ca_file: j.jwks_ca_file.clone(),
                            refresh: Duration::from_secs(j.jwks_refresh_secs),
                        },
                        (None, file) => kiln_api::auth::jwks::JwksSource::File(file.clone().unwrap_or_default()),
                    },
                    issuer: j.issuer.clone(),
                    audience: j.audience.clone(),
                    hosts_claim: j.hosts_claim.clone(),
                    leeway_secs: j.leeway_secs,
                }),
            },
            limits: kiln_api::LimitSettings {
                requests_per_second: self.limits.requests_per_second,
                burst: self.limits.burst,
                max_concurrent: self.limits.max_concurrent,
                slot_lease: Duration::from_secs(self.limits.slot_lease_secs),
            },
        }
    }

    pub fn store_options(&self) -> kiln_store::StoreOptions {
        kiln_store::StoreOptions {
            database_url: self.database_url.clone(),
            max_connections: self.store.max_connections,
            sqlite_full_sync: self.store.sqlite_sync == "full",
            busy_timeout: Duration::from_millis(self.store.busy_timeout_ms),
        }
    }

    /// This config as TOML, with passwords in URLs hidden.
    pub fn to_redacted_toml(&self) -> anyhow::Result<String> {
        let mut shown = self.clone();
        shown.database_url = redact_url(&self.database_url);
        Ok(toml::to_string_pretty(&shown)?)
    }
}

/// Replaces the password of a URL (if any) with `********`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("********"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact_url("postgres://kiln:s3cret@db:5432/kiln"), "postgres://kiln:********@db:5432/kiln");
        assert_eq!(redact_url("sqlite://./.kiln/kiln.db"), "sqlite://./.kiln/kiln.db");
        let c = Config { database_url: "postgres://u:hunter2@h/d".into(), ..Config::default() };
        let shown = c.to_redacted_toml().unwrap();
        assert!(!shown.contains("hunter2") && shown.contains("********"), "{shown}");
    }

    #[test]
    fn validation_names_the_setting() {
        let bad = |c: Config| c.validate().unwrap_err().to_string();
        assert!(bad(Config { listen: "0.0.0.0:8788".parse().unwrap(), ..Config::default() }).starts_with("listen:"));
        let mut c = Config { listen: "0.0.0.0:8788".parse().unwrap(), ..Config::default() };
        c.auth.required = true;
        c.validate().unwrap();
        let mut c = Config::default();
        c.mcp.allowed_origins = vec!["app.example.com".into()];
        assert!(bad(c).starts_with("mcp.allowed_origins[0]"));
        let mut c = Config::default();
        c.limits.requests_per_second = -1.0;
        assert!(bad(c).starts_with("limits.requests_per_second"));
        assert!(bad(Config { database_url: "mysql://x".into(), ..Config::default() }).starts_with("database_url"));
        let mut c = Config::default();
        c.log.format = "xml".into();
        assert!(bad(c).starts_with("log.format"));
        let mut c = Config::default();
        c.projections.batch_size = 0;
        assert!(bad(c).starts_with("projections.batch_size"));
        let mut c = Config::default();
        c.sandbox.network_allow = Some(vec!["api.example.com".into(), "https://x.com".into()]);
        assert!(bad(c).starts_with("sandbox.network_allow[1]"));
        let mut c = Config::default();
        c.sandbox.max_per_tool = 9;
        assert!(bad(c).starts_with("sandbox:"));
        let mut c = Config::default();
        c.mcp.call_budget_ms = 600_000;
        assert!(bad(c).starts_with("limits.slot_lease_secs"));
        let jwt = |file: Option<&str>, url: Option<&str>| {
            let mut c = Config::default();
            c.auth.required = true;
            c.auth.jwt = Some(JwtConfig {
                jwks_file: file.map(PathBuf::from),
                jwks_url: url.map(str::to_owned),
                jwks_ca_file: None,
                jwks_refresh_secs: 3600,
                issuer: "https://idp.example.com/".into(),
                audience: "kiln".into(),
                hosts_claim: "kiln_hosts".into(),
                leeway_secs: 30,
            });
            c
        };
        jwt(None, Some("https://idp.example.com/jwks.json")).validate().unwrap();
        jwt(None, Some("http://127.0.0.1:8080/jwks.json")).validate().unwrap();
        assert!(bad(jwt(None, Some("http://idp.example.com/jwks.json"))).starts_with("auth.jwt.jwks_url:"));
        assert!(bad(jwt(None, None)).starts_with("auth.jwt: set jwks_file or jwks_url"));
        assert!(bad(jwt(Some("/etc/jwks.json"), Some("https://idp.example.com/j"))).contains("not both"));
    }
}
