//! JWT bearer tokens checked against a JWKS fetched over HTTPS (`auth.jwt.jwks_url`): a real
//! TLS server in the test, its certificate from a CA made at test time with the `openssl` CLI,
//! and a real `kiln serve`. Tokens come from tests/mcp/jwt_auth.py (PyJWT).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, kiln, run_client};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("the openssl CLI runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA (`<name>-ca.pem`) and a certificate it signed for 127.0.0.1 (`<name>.pem`, `<name>.key`).
fn make_ca_and_cert(dir: &Path, name: &str) {
    let (ca_key, ca) = (format!("{name}-ca.key"), format!("{name}-ca.pem"));
    let subj = format!("/CN=kiln test CA {name}");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &ca_key,
            "-out",
            &ca,
            "-days",
            "2",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    let (key, csr, cert) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

/// An HTTPS server answering every GET with the current JWKS, counting the requests.
#[derive(Clone)]
struct JwksServer {
    addr: std::net::SocketAddr,
    body: Arc<Mutex<Vec<u8>>>,
    fetches: Arc<AtomicUsize>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl JwksServer {
    async fn start(dir: &Path, name: &str, body: Vec<u8>) -> Self {
        let certs = CertificateDer::pem_file_iter(dir.join(format!("{name}.pem")))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
        #[allow(deprecated)] // ring, as Kiln's client uses (rustls deprecates it for lacking post-quantum kx)
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (body, fetches) = (Arc::new(Mutex::new(body)), Arc::new(AtomicUsize::new(0)));
        let (b, f) = (body.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, b, f) = (acceptor.clone(), b.clone(), f.clone());
                tokio::spawn(async move {
                    // A client that refuses our certificate ends the handshake here.
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    f.fetch_add(1, Ordering::SeqCst);
                    let body = b.lock().unwrap().clone();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(head.as_bytes()).await;
                    let _ = tls.write_all(&body).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self { addr, body, fetches, task: Arc::new(task) }
    }

    fn url(&self) -> String {
        format!("https://{}/.well-known/jwks.json", self.addr)
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn stop(&self) {
        self.task.abort();
    }
}

/// A JWKS holding the keys of every folder's jwks.json.
fn jwks_of(dirs: &[&Path]) -> Vec<u8> {
    let keys: Vec<serde_json::Value> = dirs
        .iter()
        .flat_map(|d| {
            let set: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("jwks.json")).unwrap()).unwrap();
            set["keys"].as_array().unwrap().clone()
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
}

fn token(dir: &Path) -> String {
    run_client("jwt_auth.py", &["token", dir.to_str().unwrap()]).trim().to_owned()
}

fn serve_with_jwks(dir: &Path, url: &str, ca: &Path) -> Server {
    let mut cmd = kiln(dir);
    cmd.env("KILN_DATABASE_URL", format!("sqlite://{}/kiln.db", dir.display()))
        .env("KILN_AUTH__REQUIRED", "true")
        .env("KILN_AUTH__JWT__JWKS_URL", url)
        .env("KILN_AUTH__JWT__JWKS_CA_FILE", ca)
        .env("KILN_AUTH__JWT__ISSUER", "https://idp.test")
        .env("KILN_AUTH__JWT__AUDIENCE", "kiln");
    Server::start_with(cmd, &["serve", "--listen", "127.0.0.1:0"])
}

/// A raw `initialize` POST with a bearer token: (status, head and as much body as came first).
async fn initialize(addr: &str, token: &str) -> (u16, String) {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#;
    let req = format!(
        "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nAuthorization: Bearer {token}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Refusals are short and closed; an accepted initialize streams: stop after its head.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk)).await.unwrap().unwrap();
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if n == 0 || (text.contains("\r\n\r\n") && text.starts_with("HTTP/1.1 200")) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    (text.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status line"), text)
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_checked_against_a_jwks_fetched_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca_and_cert(d, "idp");
    make_ca_and_cert(d, "other");
    let (k1, k2, k3) = (d.join("k1"), d.join("k2"), d.join("k3"));
    for (k, kid) in [(&k1, "k1"), (&k2, "k2"), (&k3, "k3")] {
        std::fs::create_dir(k).unwrap();
        run_client("jwt_auth.py", &["keygen", k.to_str().unwrap(), kid]);
    }
    let (t1, t2, t3) = (token(&k1), token(&k2), token(&k3));

    let idp = JwksServer::start(d, "idp", jwks_of(&[&k1])).await;
    let kiln_dir = tempfile::tempdir().unwrap();
    let server = serve_with_jwks(kiln_dir.path(), &idp.url(), &d.join("idp-ca.pem"));
    eventually("the JWKS is fetched at start", || idp.fetches() == 1).await;

    let (status, text) = initialize(&server.addr, &t1).await;
    assert_eq!(status, 200, "a token signed by a key of the fetched set is accepted: {text}");
    assert_eq!(idp.fetches(), 1, "a known key needs no fetch");

    // The provider rotates in a new key: a token naming it makes Kiln fetch the set once more.
    *idp.body.lock().unwrap() = jwks_of(&[&k1, &k2]);
    let (status, text) = initialize(&server.addr, &t2).await;
    assert_eq!(status, 200, "a token with a new kid is accepted after one refresh: {text}");
    assert_eq!(idp.fetches(), 2, "one refresh for the unknown kid");

    // Another unknown kid right after: refused without hammering the provider.
    let (status, text) = initialize(&server.addr, &t3).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("no key \\\"k3\\\" in the JWKS"), "the refusal names the key: {text}");
    assert_eq!(idp.fetches(), 2, "unknown-kid refreshes are rate-limited");

    // The provider goes away: the cached set keeps serving.
    idp.stop();
    let (status, text) = initialize(&server.addr, &t1).await;
    assert_eq!(status, 200, "cached keys outlive the provider: {text}");
    server.terminate();

    // Started while the provider is down: a clear 503, not a panic and not a bogus 401.
    let down_dir = tempfile::tempdir().unwrap();
    let down = serve_with_jwks(down_dir.path(), &idp.url(), &d.join("idp-ca.pem"));
    let (status, text) = initialize(&down.addr, &t1).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("cannot check the bearer token now") && text.contains(&idp.url()), "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after: "), "{text}");
    down.terminate();

    // A server whose certificate the configured CA did not sign is refused.
    let idp2 = JwksServer::start(d, "idp", jwks_of(&[&k1])).await;
    let wrong_dir = tempfile::tempdir().unwrap();
    let wrong = serve_with_jwks(wrong_dir.path(), &idp2.url(), &d.join("other-ca.pem"));
    let (status, text) = initialize(&wrong.addr, &t1).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("TLS with 127.0.0.1") && text.contains("certificate"), "the TLS failure is named: {text}");
    assert_eq!(idp2.fetches(), 0, "no JWKS is read from an untrusted server");
    wrong.terminate();
    idp2.stop();
}
