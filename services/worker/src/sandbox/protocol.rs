//! The wire protocol between the host and the bridge script (`bridge/bridge.js`): one JSON object
//! per line. Host -> bridge lines are plain JSON on stdin. Bridge -> host lines on stdout start
//! with the record separator byte 0x1e; any other stdout bytes are "stray" output (a library that
//! wrote to the real stdout) and are surfaced as log lines, never parsed as frames.

use std::io;

use kiln_proto::RunId;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use super::{CodeFormat, LogLevel};

/// Marks the start of a bridge -> host frame.
pub(crate) const RS: u8 = 0x1e;

/// The bridge script, embedded so an installed binary needs nothing beside it.
pub(crate) const BRIDGE_JS: &str = include_str!("../../bridge/bridge.js");

/// What tool code gets for `node:worker_threads` (see `permissions::IMPORT_MAP`).
pub(crate) const WORKER_THREADS_STUB: &str = include_str!("../../bridge/worker_threads.js");

/// A stray stdout line longer than this is cut (the rest of it is discarded).
const MAX_STRAY_LINE: usize = 8 << 10;

#[derive(Debug, Serialize)]
#[serde(tag = "t", rename_all = "snake_case", rename_all_fields = "camelCase")]
pub(crate) enum Outbound<'a> {
    Load {
        id: u64,
        code: &'a str,
        name: &'a str,
        version: u32,
        max_log_bytes: u64,
    },
    Invoke {
        id: u64,
        args: &'a Value,
        run_id: RunId,
        attempt: u32,
        max_log_bytes: u64,
        max_output_bytes: u64,
    },
    Reply {
        cid: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        value: Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Abort {
        id: u64,
        reason: &'static str,
    },
    Check {
        id: u64,
        code: &'a str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum InboundKind {
    Ready,
    Loaded,
    Log,
    Progress,
    Call,
    Ok,
    Err,
    Checked,
}

/// Any bridge -> host frame; which fields are set depends on `t`.
#[derive(Debug, Deserialize)]
pub(crate) struct Inbound {
    pub t: InboundKind,
    #[serde(default)]
    pub id: u64,
    #[serde(default)]
    pub value: Value,
    pub error: Option<BridgeError>,
    pub level: Option<LogLevel>,
    pub msg: Option<String>,
    #[serde(default)]
    pub truncated: bool,
    pub done: Option<f64>,
    pub total: Option<f64>,
    pub message: Option<String>,
    pub cid: Option<u64>,
    pub method: Option<String>,
    #[serde(default)]
    pub params: Value,
    pub format: Option<CodeFormat>,
}

impl Inbound {
    /// Whether this frame ends the exchange it belongs to.
    pub fn is_final(&self) -> bool {
        matches!(self.t, InboundKind::Ok | InboundKind::Err | InboundKind::Loaded | InboundKind::Checked)
    }
}

/// A thrown value as the bridge describes it (see `describe` in the bridge).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct BridgeError {
    pub name: Option<String>,
    pub message: Option<String>,
    pub stack: Option<String>,
    /// Deno's permission message, when the value (or its `cause`) is `NotCapable`.
    pub permission: Option<String>,
    pub non_error: bool,
    pub invalid_output: Option<String>,
    pub code_invalid: Option<BridgeCodeInvalid>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct BridgeCodeInvalid {
    pub message: String,
    pub line: Option<u32>,
    pub column: Option<u32>,
}

/// What the host read from a bridge's stdout.
#[derive(Debug)]
pub(crate) enum Item {
    Frame(Box<Inbound>),
    Stray(String),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("reading from the sandbox process: {0}")]
    Io(#[from] io::Error),
    #[error("the sandbox process sent a message larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the sandbox process sent a malformed message: {0}")]
    Malformed(serde_json::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    LineStart,
    Frame,
    Stray,
}

/// Splits a bridge's stdout into frames and stray lines. Cancel-safe: all progress is kept in
/// `self`, so a `select!` may drop `next()` and call it again.
#[derive(Debug)]
pub(crate) struct FrameReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    state: State,
    pub max_frame: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner: BufReader::with_capacity(64 << 10, inner),
            buf: Vec::new(),
            state: State::LineStart,
            max_frame: 1 << 20,
        }
    }

    /// The next frame or stray line; `None` at end of stream.
    pub async fn next(&mut self) -> Result<Option<Item>, ReadError> {
        let Self { inner, buf, state, max_frame } = self;
        loop {
            let chunk = inner.fill_buf().await?;
            if chunk.is_empty() {
                return Ok(match *state {
                    State::Stray if !buf.is_empty() => Some(Item::Stray(take_string(buf))),
                    _ => None,
                });
            }
            let mut used = 0;
            let mut found = None;
            while used < chunk.len() && found.is_none() {
                let rest = &chunk[used..];
                match *state {
                    State::LineStart if rest[0] == RS => {
                        *state = State::Frame;
                        used += 1;
                    }
                    State::LineStart => *state = State::Stray,
                    State::Frame => {
                        let end = rest.iter().position(|&b| b == b'\n');
                        let take = end.unwrap_or(rest.len());
                        if buf.len() + take > *max_frame {
                            return Err(ReadError::TooLarge { limit: *max_frame });
                        }
                        buf.extend_from_slice(&rest[..take]);
                        used += take;
                        if end.is_some() {
                            used += 1;
                            *state = State::LineStart;
                            let frame = serde_json::from_slice::<Inbound>(buf).map_err(ReadError::Malformed);
                            buf.clear();
                            found = Some(frame.map(|f| Item::Frame(Box::new(f))));
                        }
                    }
                    State::Stray => {
                        let end = rest.iter().position(|&b| b == b'\n' || b == RS);
                        let take = end.unwrap_or(rest.len());
                        let room = MAX_STRAY_LINE.saturating_sub(buf.len());
                        buf.extend_from_slice(&rest[..take.min(room)]);
                        used += take;
                        if let Some(end) = end {
                            if rest[end] == b'\n' {
                                used += 1;
                            }
                            *state = State::LineStart;
                            if !buf.is_empty() {
                                found = Some(Ok(Item::Stray(take_string(buf))));
                            }
                        }
                    }
                }
            }
            inner.consume(used);
            if let Some(found) = found {
                return found.map(Some);
            }
        }
    }
}

fn take_string(buf: &mut Vec<u8>) -> String {
    let s = String::from_utf8_lossy(buf).into_owned();
    buf.clear();
    s
}

/// Standard base64 with padding, for `data:` URLs.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar\xff"), "Zm9vYmFy/w==");
    }

    async fn read_all(input: &[u8], max_frame: usize) -> Vec<Result<String, String>> {
        let mut r = FrameReader::new(input);
        r.max_frame = max_frame;
        let mut out = Vec::new();
        loop {
            match r.next().await {
                Ok(None) => return out,
                Ok(Some(Item::Frame(f))) => out.push(Ok(format!("frame {:?} {}", f.t, f.id))),
                Ok(Some(Item::Stray(s))) => out.push(Ok(format!("stray {s}"))),
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn frames_and_stray_output_are_told_apart() {
        let input = b"\x1e{\"t\":\"ready\"}\nhello\n\nnot a frame\x1e{\"t\":\"ok\",\"id\":3,\"value\":1}\ntail";
        let got = read_all(input, 1024).await;
        let want = ["frame Ready 0", "stray hello", "stray not a frame", "frame Ok 3", "stray tail"];
        assert_eq!(got, want.map(|s| Ok(s.to_owned())));
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_and_long_stray_lines_cut() {
        let long = format!("{}\n\x1e{{\"t\":\"ready\"}}\n", "x".repeat(MAX_STRAY_LINE * 3));
        let got = read_all(long.as_bytes(), 1024).await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].as_ref().map(String::len), Ok("stray ".len() + MAX_STRAY_LINE));
        let big = format!("\x1e{{\"t\":\"ok\",\"value\":\"{}\"}}\n", "x".repeat(2000));
        assert!(matches!(read_all(big.as_bytes(), 1024).await.as_slice(), [Err(e)] if e.contains("larger than 1024")));
    }
}
