//! `edge-gateway`: placeholder until the uplink issue lands the receive path.

fn main() {
    eprintln!(
        "edge-gateway {}: not built yet; see the uplink issue.",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
