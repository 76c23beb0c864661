//! A scriptable HTTP/1.1 server standing in for a webhook destination (a system we do
//! not ship): it records every request (headers, body, when) and answers each with
//! whatever the test's responder says — a status, a `Retry-After`, a delay.
//!
//! Plain std threads and blocking sockets, one thread per connection, keep-alive
//! supported (the gateway pools connections). Bodies must carry `Content-Length`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Largest request body read.
const MAX_BODY: usize = 16 << 20;

/// One request as received, with how it was answered.
#[derive(Debug, Clone)]
pub struct Request {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Status answered.
    pub status: u16,
    /// How long the answer was held back.
    pub delay: Duration,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Answered 2xx at once: the sender saw the success.
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status) && self.delay.is_zero()
    }
}

/// How to answer one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub delay: Duration,
    pub body: String,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::status(200)
    }

    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            retry_after: None,
            delay: Duration::ZERO,
            body: String::new(),
        }
    }

    pub fn retry_after(mut self, value: &str) -> Reply {
        self.retry_after = Some(value.to_owned());
        self
    }

    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }

    pub fn body(mut self, body: &str) -> Reply {
        self.body = body.to_owned();
        self
    }
}

type Responder = Box<dyn FnMut(&Request) -> Reply + Send>;

struct Shared {
    responder: Mutex<Responder>,
    requests: Mutex<Vec<Request>>,
    stop: AtomicBool,
}

/// The running server; stops when dropped.
pub struct WebhookServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WebhookServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl WebhookServer {
    /// Listens on a free loopback port; `responder` decides each answer (it sees
    /// the request with `status` not yet set).
    pub fn start(responder: impl FnMut(&Request) -> Reply + Send + 'static) -> WebhookServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind webhook server");
        let addr = listener.local_addr().expect("webhook server address");
        let shared = Arc::new(Shared {
            responder: Mutex::new(Box::new(responder)),
            requests: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let conn_shared = Arc::clone(&accept_shared);
                std::thread::spawn(move || serve(stream, &conn_shared));
            }
        });
        WebhookServer { addr, shared }
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Requests answered with an immediate 2xx.
    pub fn accepted(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(Request::accepted)
            .collect()
    }
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn serve(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let Some(mut request) = read_request(&mut reader) else {
            return;
        };
        let reply = {
            let mut responder = shared
                .responder
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            responder(&request)
        };
        request.status = reply.status;
        request.delay = reply.delay;
        shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request);
        if !reply.delay.is_zero() {
            std::thread::sleep(reply.delay);
        }
        let mut head = format!(
            "HTTP/1.1 {} Scripted\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n",
            reply.status,
            reply.body.len()
        );
        if let Some(after) = &reply.retry_after {
            head.push_str(&format!("Retry-After: {after}\r\n"));
        }
        head.push_str("\r\n");
        let sent = writer
            .write_all(head.as_bytes())
            .and_then(|()| writer.write_all(reply.body.as_bytes()))
            .and_then(|()| writer.flush());
        // A held-back answer usually finds the client gone: close either way.
        if sent.is_err() || !reply.delay.is_zero() {
            return;
        }
    }
}

/// Reads one request; `None` at EOF or on anything malformed.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let at = Instant::now();
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if len > MAX_BODY {
        return None;
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        at,
        method,
        path,
        headers,
        body,
        status: 0,
        delay: Duration::ZERO,
    })
}
