//! End-to-end harness: starts the real `edge-agent` binary on a free port in a temp
//! dir, talks to it over real HTTP, and runs its CLI subcommands.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod bench;
pub mod http;
pub mod mosquitto;
pub mod postgres;
pub mod wireload;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Path of a workspace binary built for the same profile as this test.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dir = std::env::current_exe()
        .expect("test exe path")
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir")
        .to_owned();
    let path = dir.join(name);
    BUILT.get_or_init(|| {
        if !path.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--bins"])
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build --bins failed");
        }
    });
    assert!(
        path.exists(),
        "{} missing: run `cargo build --bins` first",
        path.display()
    );
    path
}

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A test's view of one agent: its config file, data dir and (when running) process.
#[derive(Debug)]
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub addr: SocketAddr,
    child: Option<Child>,
}

/// Config used by tests unless they pass their own: permissive consent, one lane.
pub const BASE_CONFIG: &str = r#"
[segment]
write_keys = ["test-key"]
[[mparticle.keys]]
key = "mp-key"
secret = "mp-secret"
"#;

impl Agent {
    /// Prepares an agent whose config is `extra` plus a `[http] listen` on a free port.
    /// `extra` must not contain an `[http]` table; use `http_extra` for its keys.
    pub fn new(extra: &str, http_extra: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        Self::in_dir(dir, extra, http_extra)
    }

    pub fn in_dir(dir: tempfile::TempDir, extra: &str, http_extra: &str) -> Agent {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config_path = dir.path().join("agent.toml");
        let data_dir = dir.path().join("data");
        let text = format!("[http]\nlisten = \"{addr}\"\n{http_extra}\n{extra}\n");
        std::fs::write(&config_path, text).unwrap();
        Agent {
            dir,
            config_path,
            data_dir,
            addr,
            child: None,
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(bin("edge-agent"));
        c.arg("--config")
            .arg(&self.config_path)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", "warn");
        c
    }

    /// Starts `edge-agent run` and waits until it answers `/health`.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = self
            .command()
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let addr = self.addr;
        let up = wait_until(Duration::from_secs(15), || {
            http::get(addr, "/health")
                .map(|r| r.status == 200)
                .unwrap_or(false)
        });
        if !up {
            let log = self.stop_kill();
            panic!("agent did not come up on {addr}: {log}");
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: a crash as far as the agent knows. Returns its stderr.
    pub fn stop_kill(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return String::new();
        };
        let _ = child.kill();
        let _ = child.wait();
        drain_stderr(&mut child)
    }

    /// SIGTERM and wait; returns (exit success, stderr).
    pub fn stop_term(&mut self) -> (bool, String) {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status.success(), drain_stderr(&mut child));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return (
                    false,
                    format!("did not exit after SIGTERM: {}", drain_stderr(&mut child)),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a CLI subcommand against this agent's config and data dir.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// `spool export`, parsed (agent must be stopped).
    pub fn export(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["spool", "export"]);
        assert!(
            out.status.success(),
            "export failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `GET /v1/status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        let r = http::get(self.addr, "/v1/status").unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str(&r.body).unwrap()
    }

    pub fn spool_file(&self) -> PathBuf {
        self.data_dir.join("spool.redb")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop_kill();
    }
}

fn drain_stderr(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Sends signal `sig` (e.g. "TERM", "KILL") to `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Reads a test fixture from `tests/fixtures/`.
pub fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `Authorization` value for HTTP Basic.
pub fn basic(user: &str, pass: &str) -> String {
    edge_agent::commands::basic_auth(user, pass)
}

/// A test's gateway: config, data dir, and (when running) process.
#[derive(Debug)]
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    child: Option<Child>,
}

impl Gateway {
    /// A gateway on free ports with dev certificates for `devices` and one file
    /// destination `events` in `<data>/out`. `extra` is appended to the config.
    pub fn new(devices: &[&str], extra: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let mqtt: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config_path = dir.path().join("gateway.toml");
        let data_dir = dir.path().join("data");
        let list = devices
            .iter()
            .map(|d| format!("\"{d}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            "[mqtt]\nlisten = \"{mqtt}\"\n[http]\nlisten = \"{http}\"\n[tls]\ncreate_dev_certs = true\ndev_devices = [{list}]\n{extra}\n[[destinations]]\nname = \"events\"\nkind = \"file\"\ndir = \"out\"\nmax_file_size = \"1MiB\"\nmax_file_age = \"2s\"\n"
        );
        std::fs::write(&config_path, text).unwrap();
        Gateway {
            dir,
            config_path,
            data_dir,
            mqtt,
            http,
            child: None,
        }
    }

    pub fn pki(&self) -> PathBuf {
        self.data_dir.join("pki")
    }

    /// The `[agent]` + `[uplink]` config an agent needs to reach this gateway as `device`.
    pub fn agent_config(&self, device: &str, uplink_extra: &str) -> String {
        let pki = self.pki();
        format!(
            "[agent]\ndevice_id = \"{device}\"\n{BASE_CONFIG}\n[uplink]\nurl = \"mqtts://{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nbackoff_min = \"50ms\"\nbackoff_max = \"500ms\"\nack_timeout = \"3s\"\n{uplink_extra}\n",
            self.mqtt,
            pki.join("ca.pem").display(),
            pki.join(format!("devices/{device}.pem")).display(),
            pki.join(format!("devices/{device}.key")).display(),
        )
    }

    fn command(&self) -> Command {
        let mut c = Command::new(bin("edge-gateway"));
        c.arg("--config")
            .arg(&self.config_path)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", "warn");
        c
    }

    /// Runs a CLI subcommand against this gateway's config and data dir.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// Starts `edge-gateway run` and waits for `/health`.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = self
            .command()
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let addr = self.http;
        if !wait_until(Duration::from_secs(20), || {
            http::get(addr, "/health")
                .map(|r| r.status == 200)
                .unwrap_or(false)
        }) {
            let log = self.stop_kill();
            panic!("gateway did not come up: {log}");
        }
    }

    pub fn stop_kill(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return String::new();
        };
        let _ = child.kill();
        let _ = child.wait();
        drain_stderr(&mut child)
    }

    pub fn stop_term(&mut self) -> (bool, String) {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status.success(), drain_stderr(&mut child));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return (
                    false,
                    format!("did not exit after SIGTERM: {}", drain_stderr(&mut child)),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every line of every file the `events` destination wrote (closed or open).
    pub fn delivered(&self) -> Vec<serde_json::Value> {
        let out = self.data_dir.join("out");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&out)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        let mut lines = Vec::new();
        for f in files {
            let text = read_rotating(&f);
            // The destination may be mid-write: a last line without its newline is
            // not delivered yet.
            for l in text
                .split_inclusive('\n')
                .filter_map(|l| l.strip_suffix('\n'))
            {
                lines.push(
                    serde_json::from_str(l)
                        .unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", f.display())),
                );
            }
        }
        lines
    }

    /// Number of delivered lines (cheaper than parsing them).
    pub fn delivered_count(&self) -> usize {
        let out = self.data_dir.join("out");
        std::fs::read_dir(&out)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| {
                        read_rotating(&e.path())
                            .bytes()
                            .filter(|c| *c == b'\n')
                            .count()
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// Reads a destination file that may be renamed from `x.open` to `x` meanwhile.
fn read_rotating(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(_) => path
            .to_str()
            .and_then(|p| p.strip_suffix(".open"))
            .and_then(|closed| std::fs::read_to_string(closed).ok())
            .unwrap_or_default(),
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop_kill();
    }
}
