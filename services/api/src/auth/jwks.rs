//! Where the JWK set comes from: a file (re-read when it changes) or the identity provider's URL
//! over HTTPS (rustls with the `ring` provider; the Mozilla roots from `webpki-roots` plus an
//! optional extra CA bundle). A fetched set is cached, refreshed periodically in the background,
//! and refreshed at once when a token names a key the set does not have (at most once per
//! [`KID_REFRESH_INTERVAL`], so tokens with made-up key ids cannot make Kiln hammer the
//! provider). While the provider cannot be reached the cached set keeps serving.
//!
//! Not here: what a key may verify (that is [`super::jwt`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

use super::jwt::JwtError;

/// Unknown key ids trigger a refresh at most this often.
pub const KID_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// While no set has been fetched yet, requests retry the fetch at most this often.
const EMPTY_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Connecting, the TLS handshake and the response together.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A JWK set larger than this is refused.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Where to read the keys from (`[auth.jwt]`: `jwks_file` or `jwks_url`).
#[derive(Debug, Clone, PartialEq)]
pub enum JwksSource {
    File(PathBuf),
    Url {
        /// `https://`, or `http://` to a loopback address.
        url: String,
        /// Extra CA certificates (PEM) trusted besides the public roots.
        ca_file: Option<PathBuf>,
        /// How often the set is fetched again in the background.
        refresh: Duration,
    },
}

impl JwksSource {
    pub fn describe(&self) -> String {
        match self {
            Self::File(p) => p.display().to_string(),
            Self::Url { url, .. } => url.clone(),
        }
    }
}

/// The key set as last loaded, and when.
#[derive(Debug, Default)]
struct Cached {
    keys: Option<Arc<JwkSet>>,
    /// The file's modification time the keys were read at (file source).
    mtime: Option<SystemTime>,
    last_attempt: Option<Instant>,
    last_kid_refresh: Option<Instant>,
    last_error: Option<String>,
}

/// The JWK set of one source, shared by every request.
#[derive(Debug)]
pub struct Jwks {
    source: JwksSource,
    fetcher: Option<Fetcher>,
    cached: Mutex<Cached>,
    /// One fetch at a time: requests that arrive during a fetch wait for its result.
    fetching: tokio::sync::Mutex<()>,
}

impl Jwks {
    /// A file is read now (a wrong path is a start-up error); a URL is checked for its form and
    /// TLS settings now, and fetched in the background (an unreachable provider does not stop
    /// Kiln from starting; requests get 503 until the first fetch succeeds).
    pub fn new(source: JwksSource) -> Result<Arc<Self>, JwtError> {
        let fetcher = match &source {
            JwksSource::File(_) => None,
            JwksSource::Url { url, ca_file, .. } => Some(Fetcher::new(url, ca_file.as_deref())?),
        };
        let jwks = Arc::new(Self { source, fetcher, cached: Mutex::default(), fetching: tokio::sync::Mutex::new(()) });
        match &jwks.source {
            JwksSource::File(path) => {
                let (mtime, keys) = read_file(path)?;
                let mut c = jwks.lock();
                c.keys = Some(Arc::new(keys));
                c.mtime = Some(mtime);
            }
            JwksSource::Url { refresh, .. } => {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(refresh_periodically(Arc::downgrade(&jwks), *refresh));
                }
            }
        }
        Ok(jwks)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.cached.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current set (re-reading a changed file; fetching if none was fetched yet).
    pub async fn current(&self) -> Result<Arc<JwkSet>, JwtError> {
        if let JwksSource::File(path) = &self.source {
            let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if mtime != self.lock().mtime {
                let (mtime, keys) = read_file(path)?;
                let mut c = self.lock();
                c.keys = Some(Arc::new(keys));
                c.mtime = Some(mtime);
            }
        }
        let (keys, retry) = {
            let c = self.lock();
            let due = c.last_attempt.is_none_or(|t| t.elapsed() >= EMPTY_RETRY_INTERVAL);
            (c.keys.clone(), due)
        };
        match keys {
            Some(keys) => Ok(keys),
            None if retry && self.fetcher.is_some() => self.refresh().await,
            None => Err(self.unavailable()),
        }
    }

    /// A token named `kid`, which the current set lacks: fetch the set again, unless that was done
    /// for an unknown key less than [`KID_REFRESH_INTERVAL`] ago. Returns the set to look in.
    pub async fn refresh_for_unknown_kid(&self) -> Result<Option<Arc<JwkSet>>, JwtError> {
        if self.fetcher.is_none() {
            return Ok(None);
        }
        {
            let mut c = self.lock();
            if c.last_kid_refresh.is_some_and(|t| t.elapsed() < KID_REFRESH_INTERVAL) {
                return Ok(None);
            }
            c.last_kid_refresh = Some(Instant::now());
        }
        self.refresh().await.map(Some)
    }

    /// Fetches the set now (one fetch at a time); keeps the previous set if the fetch fails.
    async fn refresh(&self) -> Result<Arc<JwkSet>, JwtError> {
        let Some(fetcher) = &self.fetcher else { return Err(self.unavailable()) };
        let started = Instant::now();
        let _one = self.fetching.lock().await;
        {
            // Someone else fetched while this request waited: use their outcome.
            let c = self.lock();
            if c.last_attempt.is_some_and(|t| t > started) {
                return match (&c.keys, &c.last_error) {
                    (Some(keys), None) => Ok(keys.clone()),
                    (_, error) => Err(JwtError::Jwks {
                        path: fetcher.uri.to_string(),
                        message: error.clone().unwrap_or_else(|| "no keys".to_owned()),
                    }),
                };
            }
        }
        let fetched = fetcher.fetch().await;
        let mut c = self.lock();
        c.last_attempt = Some(Instant::now());
        match fetched {
            Ok(keys) => {
                tracing::info!(url = %fetcher.uri, keys = keys.keys.len(), "fetched the JWKS");
                let keys = Arc::new(keys);
                c.keys = Some(keys.clone());
                c.last_error = None;
                Ok(keys)
            }
            Err(message) => {
                tracing::warn!(url = %fetcher.uri, error = %message, "cannot fetch the JWKS");
                c.last_error = Some(message.clone());
                Err(JwtError::Jwks { path: fetcher.uri.to_string(), message })
            }
        }
    }

    fn unavailable(&self) -> JwtError {
        let message = self.lock().last_error.clone().unwrap_or_else(|| "not fetched yet".to_owned());
        JwtError::Jwks { path: self.source.describe(), message }
    }
}

/// Fetches the set every `every` while the [`Jwks`] exists.
async fn refresh_periodically(jwks: Weak<Jwks>, every: Duration) {
    loop {
        {
            let Some(jwks) = jwks.upgrade() else { return };
            // Failures are logged and remembered by `refresh`; the cached set keeps serving.
            let _ = jwks.refresh().await;
        }
        tokio::time::sleep(every).await;
    }
}

fn read_file(path: &Path) -> Result<(SystemTime, JwkSet), JwtError> {
    let err = |message: String| JwtError::Jwks { path: path.display().to_string(), message };
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).map_err(|e| err(e.to_string()))?;
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    Ok((mtime, parse(&text).map_err(err)?))
}

fn parse(bytes: &[u8]) -> Result<JwkSet, String> {
    let keys: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWK set: {e}"))?;
    if keys.keys.is_empty() {
        return Err("the set has no keys".to_owned());
    }
    Ok(keys)
}

/// An HTTP(S) GET of the JWKS URL.
#[derive(Debug)]
struct Fetcher {
    uri: Uri,
    /// None for plain HTTP (loopback only).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Fetcher {
    fn new(url: &str, ca_file: Option<&Path>) -> Result<Self, JwtError> {
        let err = |message: String| JwtError::Jwks { path: url.to_owned(), message };
        check_url(url).map_err(err)?;
        let uri: Uri = url.parse().map_err(|e| err(format!("not a URL: {e}")))?;
        let tls = match uri.scheme_str() {
            Some("https") => Some(tls_config(ca_file).map_err(err)?),
            _ => None,
        };
        Ok(Self { uri, tls })
    }

    async fn fetch(&self) -> Result<JwkSet, String> {
        let body = tokio::time::timeout(FETCH_TIMEOUT, self.get())
            .await
            .map_err(|_| format!("no answer within {} s", FETCH_TIMEOUT.as_secs()))??;
        parse(&body)
    }

    async fn get(&self) -> Result<Bytes, String> {
        let host = self.uri.host().unwrap_or_default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = self.uri.port_u16().unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((bare, port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        match &self.tls {
            None => self.request(tcp).await,
            Some(tls) => {
                let name = ServerName::try_from(bare.to_owned()).map_err(|e| format!("bad server name {host}: {e}"))?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let stream =
                    connector.connect(name, tcp).await.map_err(|e| format!("TLS with {host}:{port} failed: {e}"))?;
                self.request(stream).await
            }
        }
    }

    async fn request<S>(&self, io: S) -> Result<Bytes, String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "JWKS connection ended");
            }
        });
        let authority = self.uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let path = self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let request = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json, application/jwk-set+json")
            .header(http::header::USER_AGENT, concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let response = sender.send_request(request).await.map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("the server answered {status}"));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("cannot read the response (limit {MAX_JWKS_BYTES} bytes): {e}"))?;
        Ok(body.to_bytes())
    }
}

/// Whether `url` is one Kiln will fetch a JWKS from: `https://`, or `http://` to a loopback
/// address. The error says what is wrong.
pub fn check_url(url: &str) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{url:?} has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if is_loopback(host) => Ok(()),
        _ => Err(format!("{url:?} must be https:// (http:// only to a loopback address)")),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost" || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The public web roots, plus the CA certificates in `ca_file`.
fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("the CA file {} holds no certificates", path.display()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| format!("a certificate in {} is not a CA: {e}", path.display()))?;
        }
    }
    // `ring`, not aws-lc-rs (which needs cmake and a C toolchain at build time); rustls marks
    // ring's provider deprecated only because it lacks post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        assert!(Fetcher::new("https://idp.example.com/.well-known/jwks.json", None).is_ok());
        assert!(Fetcher::new("http://127.0.0.1:8080/jwks", None).is_ok());
        assert!(Fetcher::new("http://[::1]:8080/jwks", None).is_ok());
        let e = Fetcher::new("http://idp.example.com/jwks", None).unwrap_err().to_string();
        assert!(e.contains("must be https://"), "{e}");
        let e = Fetcher::new("https://idp.example.com/jwks", Some(Path::new("/nonexistent/ca.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read the CA file"), "{e}");
    }
}
