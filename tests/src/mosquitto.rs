//! A private Mosquitto for broker-mode tests: the shipped `conf/mosquitto.conf` and
//! `conf/mosquitto.acl`, with a free port, a temp dir for its persistence and log, and
//! the certificates of a gateway's dev PKI (made with `edge-gateway certs`, as an
//! operator would). Needs `mosquitto` on the PATH (`tests/run-all` installs it).

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, signal, Gateway};

/// The gateway's client certificate CN: its Mosquitto user (see `conf/mosquitto.acl`).
pub const GATEWAY_USER: &str = "edge-gateway";

/// One Mosquitto process (when running) and its files.
#[derive(Debug)]
pub struct Mosquitto {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub conf: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// Whether this process runs as root (CI does).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

impl Mosquitto {
    /// Prepares a broker that trusts `gw`'s dev PKI and presents its server
    /// certificate; `edge-gateway certs` makes the CA, that certificate and the
    /// gateway's client certificate first if missing. Not started yet.
    pub fn new(gw: &Gateway) -> Mosquitto {
        let pki = gw.pki();
        let certs = |args: &[&str]| {
            let out = gw.cli(args);
            assert!(
                out.status.success(),
                "edge-gateway {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        certs(&["certs", "init"]);
        if !pki
            .join("devices")
            .join(format!("{GATEWAY_USER}.pem"))
            .exists()
        {
            certs(&["certs", "device", GATEWAY_USER]);
        }
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let shipped = std::fs::read_to_string(repo_file("conf/mosquitto.conf")).unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, Self::rewrite(&shipped, addr, &pki, dir.path())).unwrap();
        let log = dir.path().join("mosquitto.log");
        Mosquitto {
            dir,
            addr,
            conf,
            log,
            child: None,
        }
    }

    /// The shipped config with this instance's port and paths. Every directive it
    /// replaces must be in the shipped file, so the test runs that file, not another.
    fn rewrite(shipped: &str, addr: SocketAddr, pki: &Path, dir: &Path) -> String {
        let acl = repo_file("conf/mosquitto.acl");
        let replacements = [
            (
                "listener",
                format!("listener {} {}", addr.port(), addr.ip()),
            ),
            ("cafile", format!("cafile {}", pki.join("ca.pem").display())),
            (
                "certfile",
                format!("certfile {}", pki.join("server.pem").display()),
            ),
            (
                "keyfile",
                format!("keyfile {}", pki.join("server.key").display()),
            ),
            ("acl_file", format!("acl_file {}", acl.display())),
            (
                "persistence_location",
                format!("persistence_location {}/", dir.display()),
            ),
        ];
        let mut seen = vec![false; replacements.len()];
        let mut out = String::new();
        for line in shipped.lines() {
            let directive = line.split_whitespace().next().unwrap_or_default();
            match replacements.iter().position(|(d, _)| *d == directive) {
                Some(i) => {
                    assert!(!seen[i], "conf/mosquitto.conf: `{directive}` twice");
                    seen[i] = true;
                    out.push_str(&replacements[i].1);
                }
                None => out.push_str(line),
            }
            out.push('\n');
        }
        for ((directive, _), seen) in replacements.iter().zip(seen) {
            assert!(seen, "conf/mosquitto.conf has no `{directive}` line");
        }
        // Started as root, Mosquitto switches to the `mosquitto` user, which cannot read
        // the test's 0600 keys and temp dirs; `user root` keeps it as it is.
        if running_as_root() {
            out.push_str("user root\n");
        }
        out
    }

    /// `mqtts://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtts://{}", self.addr)
    }

    /// Starts `mosquitto -c <conf>` and waits until its port accepts connections.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run mosquitto (tests/run-all installs it): {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                self.stop_kill();
                panic!(
                    "mosquitto did not come up on {} ({exited:?}): {}",
                    self.addr,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (Mosquitto saves its persistence file) and wait.
    pub fn stop_term(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
    }

    /// SIGKILL: a broker crash; whatever it had not saved is gone.
    pub fn stop_kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (SIGKILL when `crash`, else SIGTERM) and starts again on the same port.
    pub fn restart(&mut self, crash: bool) {
        if crash {
            self.stop_kill();
        } else {
            self.stop_term();
        }
        self.start();
    }

    /// Everything Mosquitto logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Switches `gw`'s config (as written by [`Gateway::new`], not started) to broker
    /// mode against this broker, with `extra` more `[mqtt]` keys.
    pub fn configure_gateway(&self, gw: &Gateway, extra: &str) {
        let text = std::fs::read_to_string(&gw.config_path).unwrap();
        let broker = format!(
            "[mqtt]\nmode = \"broker\"\nbroker_url = \"{}\"\nclient_id = \"{GATEWAY_USER}\"\nbroker_keep_alive = \"5s\"\nbroker_backoff_min = \"50ms\"\nbroker_backoff_max = \"500ms\"\n{extra}\n",
            self.url()
        );
        assert!(
            text.contains("[mqtt]\n"),
            "gateway config has no [mqtt] table"
        );
        std::fs::write(&gw.config_path, text.replacen("[mqtt]\n", &broker, 1)).unwrap();
    }

    /// The agent config for `device` of `gw`'s PKI, pointed at this broker.
    pub fn agent_config(&self, gw: &Gateway, device: &str, uplink_extra: &str) -> String {
        let config = gw.agent_config(device, uplink_extra);
        let endpoint = format!("url = \"mqtts://{}\"", gw.mqtt);
        assert!(config.contains(&endpoint));
        config.replacen(&endpoint, &format!("url = \"{}\"", self.url()), 1)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop_kill();
    }
}
