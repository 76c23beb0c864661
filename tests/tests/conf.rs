//! Every config file shipped in `conf/` parses and validates.

use std::path::Path;

use edge_agent::config::AgentConfig;
use edge_gateway::config::{GatewayConfig, MqttMode};

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
        if name.starts_with("gateway") && name.ends_with(".toml") {
            GatewayConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(checked >= 3);
}

#[test]
fn shipped_broker_configs_agree_with_each_other_and_with_the_agent() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
    let gateway =
        GatewayConfig::load(&conf.join("gateway-broker.toml")).unwrap_or_else(|e| panic!("{e}"));
    let agent = AgentConfig::load(&conf.join("agent.toml")).unwrap_or_else(|e| panic!("{e}"));
    let mosquitto = std::fs::read_to_string(conf.join("mosquitto.conf")).unwrap();
    let acl = std::fs::read_to_string(conf.join("mosquitto.acl")).unwrap();
    let directive = |name: &str| -> Vec<String> {
        mosquitto
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(name))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
            .collect()
    };

    assert_eq!(gateway.mqtt.mode, MqttMode::Broker);
    // Agents reach the broker where conf/agent.toml points, and so does the gateway.
    let agent_url = agent
        .uplink
        .as_ref()
        .map(|u| u.url.clone())
        .unwrap_or_default();
    assert_eq!(gateway.mqtt.broker_url.as_deref(), Some(agent_url.as_str()));
    assert_eq!(directive("listener"), ["8883 127.0.0.1"]);
    assert!(agent_url.ends_with(":8883"), "{agent_url}");
    // Identities come from certificates, for ACLs and client ids.
    for (key, value) in [
        ("require_certificate", "true"),
        ("use_identity_as_username", "true"),
        ("use_username_as_clientid", "true"),
        ("allow_anonymous", "false"),
    ] {
        assert_eq!(directive(key), [value], "{key}");
    }
    // The broker passes what the gateway accepts, no more.
    assert_eq!(
        directive("max_packet_size"),
        [gateway.mqtt.max_packet_size.0.to_string()]
    );
    // The gateway's ACL user is its client id (= its certificate CN).
    assert!(
        acl.lines()
            .any(|l| l.trim() == format!("user {}", gateway.mqtt.client_id)),
        "{acl}"
    );
    assert_eq!(
        gateway.mqtt.topic_prefix, "edge/{device}",
        "the ACL patterns assume it"
    );
}

#[test]
fn the_fanout_example_has_one_destination_of_each_kind() {
    use edge_gateway::config::DestinationKind;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/gateway-fanout.toml");
    let config = GatewayConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    for kind in [
        DestinationKind::File,
        DestinationKind::Webhook,
        DestinationKind::Postgres,
        DestinationKind::AudienceWebhook,
        DestinationKind::AudienceFile,
        DestinationKind::AudiencePostgres,
    ] {
        assert!(
            config.destinations.iter().any(|d| d.kind == kind),
            "no {kind:?} destination"
        );
    }
    assert!(!config.sources.is_empty());
    assert!(!config.computed.is_empty());
    assert!(!config.audiences.is_empty() && !config.feeds.is_empty());
}
