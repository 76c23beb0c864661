//! `GET /v1/audiences` over real HTTP against the agent library's server, with the
//! membership put in place by the function the uplink calls for every
//! `Downlink::Audiences` ([`Spool::apply_audiences`]). No gateway runs: the answers
//! come from the spool file alone, as they must offline. (The path from a real
//! gateway over MQTT is covered by the end-to-end tests.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use edge_agent::config::AgentConfig;
use edge_agent::spool::Spool;
use edge_agent::wire::AudienceUpdate;
use edge_agent::Agent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const CONFIG: &str = r#"
[agent]
device_id = "tv-1"
[segment]
write_keys = ["k1"]
"#;

struct Running {
    addr: SocketAddr,
    spool: Arc<Spool>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start(dir: &Path) -> Running {
    let config = AgentConfig::parse(CONFIG, Path::new("agent.toml")).unwrap();
    let agent = Agent::open(config, dir).unwrap();
    let spool = Arc::clone(agent.spool());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        agent.serve(listener, token).await.unwrap();
    });
    Running {
        addr,
        spool,
        shutdown,
        task,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

struct Answer {
    status: u16,
    body: serde_json::Value,
}

/// One HTTP/1.1 request on a fresh connection; `key` as the Basic user.
async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    key: Option<&str>,
    body: &str,
) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = key.map_or(String::new(), |k| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{k}:"));
        format!("Authorization: Basic {b64}\r\n")
    });
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: agent\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    };
    Answer { status, body }
}

async fn get(addr: SocketAddr, target: &str) -> Answer {
    request(addr, "GET", target, Some("k1"), "").await
}

fn update(version: u64, user: &str, names: &[&str]) -> AudienceUpdate {
    AudienceUpdate {
        version,
        user_id: user.into(),
        audiences: names.iter().map(|a| (*a).to_owned()).collect(),
    }
}

#[tokio::test]
async fn membership_is_answered_from_the_spool_by_user_id() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path()).await;
    agent
        .spool
        .apply_audiences(
            update(4, "a+b@example.com", &["vip", "churn-risk"]),
            1_700_000_000_000,
        )
        .await
        .unwrap();

    let r = get(agent.addr, "/v1/audiences?userId=a%2Bb%40example.com").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        serde_json::json!({
            "userId": "a+b@example.com",
            "audiences": ["churn-risk", "vip"],
            "version": 4,
            "updatedAt": "2023-11-14T22:13:20Z",
        })
    );

    // An older resend does not change the answer; a newer set replaces it.
    agent
        .spool
        .apply_audiences(update(3, "a+b@example.com", &[]), 1)
        .await
        .unwrap();
    assert_eq!(
        get(agent.addr, "/v1/audiences?userId=a%2Bb%40example.com")
            .await
            .body["audiences"],
        serde_json::json!(["churn-risk", "vip"])
    );
    agent
        .spool
        .apply_audiences(update(6, "a+b@example.com", &["vip"]), 1)
        .await
        .unwrap();
    let r = get(agent.addr, "/v1/audiences?userId=a%2Bb%40example.com").await;
    assert_eq!(r.body["audiences"], serde_json::json!(["vip"]));
    assert_eq!(r.body["version"], 6);

    // Unknown user: no membership here, which is an answer.
    let r = get(agent.addr, "/v1/audiences?userId=nobody").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        serde_json::json!({"userId": "nobody", "audiences": [], "version": 0, "updatedAt": null})
    );

    let status = get(agent.addr, "/v1/status").await.body;
    assert_eq!(
        status["audiences"],
        serde_json::json!({"users": 1, "version": 6})
    );
    agent.stop().await;
}

#[tokio::test]
async fn without_an_id_the_devices_current_user_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path()).await;
    let r = get(agent.addr, "/v1/audiences").await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (404, Some("no_current_user")),
        "{}",
        r.body
    );

    agent
        .spool
        .apply_audiences(update(1, "anon-7", &["visitors"]), 1)
        .await
        .unwrap();
    agent
        .spool
        .apply_audiences(update(2, "u-9", &["buyers"]), 1)
        .await
        .unwrap();
    let track = |ids: &str| format!(r#"{{"event": "Opened", {ids}}}"#);
    let r = request(
        agent.addr,
        "POST",
        "/v1/track",
        Some("k1"),
        &track(r#""anonymousId": "anon-7""#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = get(agent.addr, "/v1/audiences").await;
    assert_eq!(r.body["anonymousId"], "anon-7", "{}", r.body);
    assert_eq!(r.body["audiences"], serde_json::json!(["visitors"]));

    let r = request(
        agent.addr,
        "POST",
        "/v1/track",
        Some("k1"),
        &track(r#""userId": "u-9""#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = get(agent.addr, "/v1/audiences").await;
    assert_eq!(r.body["userId"], "u-9", "{}", r.body);
    assert_eq!(r.body["audiences"], serde_json::json!(["buyers"]));
    // The anonymous id can still be asked for by name.
    let r = get(agent.addr, "/v1/audiences?anonymousId=anon-7").await;
    assert_eq!(r.body["audiences"], serde_json::json!(["visitors"]));
    agent.stop().await;
}

#[tokio::test]
async fn bad_queries_are_refused_and_the_answer_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path()).await;
    agent
        .spool
        .apply_audiences(update(2, "u1", &["a"]), 1)
        .await
        .unwrap();
    let a = agent.addr;
    // A local read, like /v1/status: no write key needed.
    let r = request(a, "GET", "/v1/audiences?userId=u1", None, "").await;
    assert_eq!(
        (r.status, r.body["version"].as_u64()),
        (200, Some(2)),
        "{}",
        r.body
    );
    for bad in [
        "/v1/audiences?userId=%zz",
        "/v1/audiences?userId=%ff",
        "/v1/audiences?userId=",
        "/v1/audiences?userId=u1&userId=u2",
        "/v1/audiences?userId=u1&anonymousId=x",
    ] {
        let r = get(a, bad).await;
        assert_eq!(
            (r.status, r.body["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}: {}",
            r.body
        );
    }
    assert_eq!(
        request(a, "POST", "/v1/audiences", Some("k1"), "{}")
            .await
            .status,
        405
    );
    agent.stop().await;

    let agent = start(dir.path()).await;
    let r = get(agent.addr, "/v1/audiences?userId=u1").await;
    assert_eq!(
        (r.status, r.body["version"].as_u64()),
        (200, Some(2)),
        "{}",
        r.body
    );
    assert_eq!(
        agent.spool.audience_summary().version,
        2,
        "what the next hello reports"
    );
    agent.stop().await;
}
