//! `edge-gateway` library: everything the binary does, callable from tests.
//!
//! - [`pki`]: the dev PKI behind `edge-gateway certs` (CA, server and device certificates).
//! - [`tls`]: TLS of the device endpoint: mutual-TLS configuration, device identity from
//!   the client certificate, revoked device ids.

pub mod pki;
pub mod tls;
