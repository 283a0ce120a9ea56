//! `GET /metrics`: Prometheus text that follows what the server really did, open to an admin
//! or the scrape token and to nobody else.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use flotilla_e2e::mqtt::connect_device;
use flotilla_e2e::{Server, wait_for};

/// The value of the sample named exactly `name` (labels included), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn scrape(server: &Server, bearer: Option<&str>) -> (u16, String) {
    let mut req = server.client.get(format!("{}/metrics", server.http));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_ingest_stored_and_open_only_to_an_admin_or_the_scrape_token() {
    let token = "scrape-secret-0123456789";
    let server = Server::start_with_env(&[], &[("FLOTILLA_METRICS_TOKEN", token)])
        .await
        .unwrap();
    let user = server.user("viewer@example.com").await.unwrap();
    let admin = server.admin("metrics-admin@example.com").await.unwrap();
    let id = server.enroll(&user, "m-1").await.unwrap();
    let mut device = connect_device(server.mqtt_port, &id).await.unwrap();
    for seq in 0..5 {
        device
            .publish("devices/m-1/telemetry", format!(r#"{{"seq":{seq}}}"#))
            .await
            .unwrap();
    }
    // Malformed: counted, not stored.
    device
        .publish("devices/m-1/telemetry", "nope")
        .await
        .unwrap();

    for bearer in [None, Some("scrape-secret"), Some(user.as_str())] {
        let (status, body) = scrape(&server, bearer).await;
        assert!(
            status == 401 || status == 403,
            "{bearer:?}: {status} {body}"
        );
        assert!(!body.contains("flotilla_"), "{body}");
    }
    for bearer in [token, admin.as_str()] {
        let text = wait_for("metrics caught up", Duration::from_secs(10), || async {
            let (status, text) = scrape(&server, Some(bearer)).await;
            assert_eq!(status, 200, "{text}");
            // All six handed over and none waiting (an external broker acks before that), and
            // the fleet figures (read at most every 5 s) show the device online: behind an
            // external broker it comes online with its first message, not at CONNECT.
            let caught_up = sample(&text, "flotilla_ingest_malformed_total") == Some(1.0)
                && sample(&text, "flotilla_ingest_received_total") == Some(6.0)
                && sample(&text, "flotilla_ingest_queued_bytes") == Some(0.0)
                && sample(&text, "flotilla_devices_online") == Some(1.0);
            caught_up.then_some(text)
        })
        .await
        .unwrap();
        // Exactly what this device sent: 5 readings, 1 malformed message, nothing else.
        for (name, value) in [
            ("flotilla_ingest_received_total", 6.0),
            ("flotilla_ingest_stored_total", 5.0),
            ("flotilla_ingest_dead_lettered_total", 0.0),
            ("flotilla_ingest_dropped_total", 0.0),
            ("flotilla_ingest_queued_bytes", 0.0),
            ("flotilla_devices", 1.0),
            ("flotilla_devices_online", 1.0),
            ("flotilla_device_certificates", 1.0),
        ] {
            assert_eq!(sample(&text, name), Some(value), "{name}:\n{text}");
        }
        let commits = sample(&text, "flotilla_ingest_commit_seconds_count").unwrap();
        assert!((1.0..=5.0).contains(&commits), "{commits}");
        let horizon = sample(&text, "flotilla_certificate_expiry_horizon_seconds").unwrap();
        assert!(horizon > 300.0 * 86_400.0, "a fresh certificate: {horizon}");
        assert!(
            !text.contains("flotilla_rollouts{"),
            "no rollout yet: {text}"
        );
    }

    // A command shows under its state.
    let (s, _) = server
        .call(
            "POST",
            "/api/device/m-1/commands",
            Some(&user),
            Some(serde_json::json!({"name": "ping"})),
        )
        .await
        .unwrap();
    assert_eq!(s, 202);
    // Fleet figures are read at most every 5 s.
    let text = wait_for("the command counted", Duration::from_secs(10), || async {
        let (_, text) = scrape(&server, Some(token)).await;
        text.contains("flotilla_commands{").then_some(text)
    })
    .await
    .unwrap();
    let commands: f64 = text
        .lines()
        .filter(|l| l.starts_with("flotilla_commands{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(commands, 1.0, "{text}");

    // The token is a secret: neither --print-config nor --help shows it.
    for arg in ["--print-config", "--help"] {
        let out = std::process::Command::new(flotilla_e2e::server_bin())
            .arg(arg)
            .env("FLOTILLA_METRICS_TOKEN", token)
            .output()
            .unwrap();
        assert!(out.status.success(), "{arg}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(token),
            "{arg}"
        );
    }
}
