//! Helpers for tests of the gateway's HTTP API: server-side sources, `[http]` keys,
//! admin calls with a Bearer token.

use std::io;
use std::net::SocketAddr;

use crate::http::{request, Response};
use crate::Gateway;

/// Write key of the Segment source `web` ([`SOURCES`]); the fixtures carry it.
pub const WEB_KEY: &str = "dev-write-key";
/// mParticle key and secret of the source `tv`.
pub const TV_KEY: &str = "mp-key";
pub const TV_SECRET: &str = "mp-secret";

/// `[[sources]]`: `web` (Segment, the fixtures' write key) and `tv` (mParticle).
pub const SOURCES: &str = "[[sources]]\nname = \"web\"\nwrite_key = \"dev-write-key\"\n\n[[sources]]\nname = \"tv\"\nwrite_key = \"mp-key\"\nsecret = \"mp-secret\"\n";

/// A gateway (not started) with [`SOURCES`], no devices, and `http` keys added to its
/// `[http]` table (e.g. `admin_token = "t"`).
pub fn gateway(http: &str) -> Gateway {
    let gw = Gateway::new(&[], SOURCES);
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let listen = format!("[http]\nlisten = \"{}\"\n", gw.http);
    assert!(text.contains(&listen), "harness config changed: {text}");
    let text = text.replacen(&listen, &format!("{listen}{http}\n"), 1);
    std::fs::write(&gw.config_path, text).unwrap();
    gw
}

/// `method path` with `Authorization: Bearer token` when `token` is given.
pub fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> io::Result<Response> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    request(addr, method, path, &headers, &[])
}
