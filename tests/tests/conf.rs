//! Every config file shipped in `conf/` parses and validates.

use std::path::Path;

use edge_agent::config::AgentConfig;

#[test]
fn shipped_agent_config_is_valid_and_listens_on_8088() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/agent.toml");
    let config = AgentConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.http.listen.to_string(), "127.0.0.1:8088");
    assert!(config.spool.lanes.len() >= 2);
}

#[test]
fn every_toml_in_conf_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.map(|e| e.path()).unwrap_or_default();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("agent") && name.ends_with(".toml") {
            AgentConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(checked >= 1);
}
