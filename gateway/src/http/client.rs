//! The admin CLI's client: one blocking HTTP/1.1 request per call to a running
//! gateway's API (`Connection: close`). Plain `http://` only: the admin API is meant
//! for loopback or a trusted network, so no TLS stack is pulled in for it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Erase and replay wait for commits: allow them time.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest answer read (a page of dead letters is the largest).
const MAX_RESPONSE: u64 = 64 << 20;

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--url` is not `http://host:port`.
    #[error("bad gateway URL `{url}`: {why}")]
    Url { url: String, why: &'static str },
    /// Nothing answered: the gateway is not running there, or the network failed.
    #[error("cannot reach the gateway at {url}: {source}")]
    Unreachable { url: String, source: std::io::Error },
    /// The answer is not HTTP we understand.
    #[error("bad answer from the gateway at {url}: {why}")]
    BadResponse { url: String, why: String },
    /// The gateway answered with an error status.
    #[error("the gateway answered {status}: {message}")]
    Refused { status: u16, message: String },
}

/// A gateway's admin API at a base URL.
#[derive(Debug, Clone)]
pub struct AdminClient {
    url: String,
    host: String,
    /// Path prefix of the base URL (no trailing `/`).
    prefix: String,
    token: Option<String>,
}

impl AdminClient {
    /// `url`: `http://host:port[/prefix]`.
    pub fn new(url: &str, token: Option<String>) -> Result<Self, ClientError> {
        let bad = |why| ClientError::Url {
            url: url.to_owned(),
            why,
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// is supported"))?;
        let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(AdminClient {
            url: url.trim_end_matches('/').to_owned(),
            host: host.to_owned(),
            prefix: format!("/{}", prefix.trim_matches('/'))
                .trim_end_matches('/')
                .to_owned(),
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// The URL calls go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `GET` `path`; the JSON answer.
    pub fn get(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.call("GET", path)
    }

    /// `method` on `path` (already percent-encoded); the JSON answer of a 2xx, else
    /// [`ClientError::Refused`] with the gateway's message.
    pub fn call(&self, method: &str, path: &str) -> Result<serde_json::Value, ClientError> {
        let (status, body) = self.send(method, path)?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Refused { status, message });
        }
        if body.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::BadResponse {
            url: self.url.clone(),
            why: format!("not JSON: {e}"),
        })
    }

    fn send(&self, method: &str, path: &str) -> Result<(u16, Vec<u8>), ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            url: self.url.clone(),
            source,
        };
        let addrs: Vec<SocketAddr> = self.host.to_socket_addrs().map_err(unreachable)?.collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        let mut stream = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let mut stream = stream.ok_or_else(|| unreachable(last))?;
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .map_err(unreachable)?;
        let mut head = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\nContent-Length: 0\r\n",
            self.prefix, self.host
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).map_err(unreachable)?;
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .map_err(unreachable)?;
        parse_response(&raw).map_err(|why| ClientError::BadResponse {
            url: self.url.clone(),
            why,
        })
    }
}

/// `(status, body)` of a whole `Connection: close` response.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("no status line")?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = &raw[split + 4..];
    if chunked {
        return dechunk(body).map(|b| (status, b));
    }
    Ok((status, body.to_vec()))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&body[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).ok_or("truncated chunk")?;
    }
}

/// Percent-encodes one path segment (everything but RFC 3986 unreserved characters).
pub fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_plain_and_chunked() {
        let plain = b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (404, b"{}".to_vec()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).unwrap(),
            (200, b"{\"a\":1}".to_vec())
        );
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn segments_are_encoded_and_urls_checked() {
        assert_eq!(encode_segment("ada@example.com"), "ada%40example.com");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
        assert!(AdminClient::new("https://x:1", None).is_err());
        let c = AdminClient::new("http://127.0.0.1:9/api/", None).unwrap();
        assert_eq!(c.prefix, "/api");
        let c = AdminClient::new("http://127.0.0.1:9", None).unwrap();
        assert_eq!(c.prefix, "");
    }

    #[test]
    fn nothing_listening_is_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = AdminClient::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
        assert!(matches!(
            c.get("/health"),
            Err(ClientError::Unreachable { .. })
        ));
    }
}
