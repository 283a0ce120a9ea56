//! The fleet security report, through the API and the CLI, against the real server: which
//! certificates expire within N days, devices in crash loops, devices provisioned and never
//! seen; refused devices are not "still connected" once the embedded broker closed them.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use flotilla_e2e::mqtt::connect_device;
use flotilla_e2e::{Cli, Server, wait_for};
use serde_json::Value;

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_security_report_names_expiring_crashing_and_never_seen_devices() {
    // Two days of life for the first certificates, the default for the later ones.
    let mut server = Server::start(&["--device-cert-validity", "172800"])
        .await
        .unwrap();
    let admin = server.admin("admin@x.io").await.unwrap();
    let short = server.enroll(&admin, "dev-short").await.unwrap();
    server.set_args(&[]);
    server.restart().await.unwrap();
    let admin = server.login("admin@x.io", "admin-pass").await.unwrap();
    server.enroll(&admin, "dev-idle").await.unwrap();
    let crashy = server.enroll(&admin, "dev-crashy").await.unwrap();
    let revoked = server.enroll(&admin, "dev-revoked").await.unwrap();

    // Seen: the short-lived one beats normally, the crashy one reports four crashed boots.
    let mut sessions = Vec::new();
    for (id, crashes) in [(&short, 0), (&crashy, 4), (&revoked, 0)] {
        let mut s = connect_device(server.mqtt_port, id).await.unwrap();
        let topic = format!("devices/{}/health", id.device_id);
        let beat = format!(r#"{{"heap":1000,"fw":"1.0.0","uptime":7,"crashes":{crashes}}}"#);
        s.publish(&topic, beat).await.unwrap();
        sessions.push(s);
    }
    wait_for("heartbeats stored", Duration::from_secs(20), || async {
        let d = server.device(&admin, "dev-crashy").await.ok()?;
        (d["crashes"] == 4).then_some(())
    })
    .await
    .unwrap();
    let (status, body) = server
        .call(
            "POST",
            "/api/admin/device/dev-revoked/revoke",
            Some(&admin),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    let (status, report) = server
        .call("GET", "/api/admin/security?days=7", Some(&admin), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{report}");
    assert_eq!(ids(&report["expiringCertificates"]), ["dev-short"]);
    let expires = report["expiringCertificates"][0]["notAfter"]
        .as_i64()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        (now + 86_400_000..now + 3 * 86_400_000).contains(&expires),
        "{report}"
    );
    assert_eq!(ids(&report["crashLoops"]), ["dev-crashy"]);
    assert_eq!(ids(&report["neverSeen"]), ["dev-idle"]);
    // The embedded broker closed the revoked device's session at once.
    assert_eq!(ids(&report["deniedButConnected"]), Vec::<String>::new());

    // A longer horizon takes in every certificate; a stricter crash count, none.
    let (_, wide) = server
        .call(
            "GET",
            "/api/admin/security?days=400&crashes=5",
            Some(&admin),
            None,
        )
        .await
        .unwrap();
    assert_eq!(ids(&wide["expiringCertificates"]).len(), 3, "{wide}");
    assert!(ids(&wide["crashLoops"]).is_empty());
    let (status, _) = server
        .call("GET", "/api/admin/security?days=-1", Some(&admin), None)
        .await
        .unwrap();
    assert_eq!(status, 400);
    let operator = server.user("op@x.io").await.unwrap();
    let (status, _) = server
        .call("GET", "/api/admin/security", Some(&operator), None)
        .await
        .unwrap();
    assert_eq!(status, 403, "admins only");

    // The CLI shows the same report.
    let cli = Cli::new(&server, &server.dir.path().join("session.json"));
    cli.login("admin@x.io", "admin-pass");
    let json = cli.json(&["security", "--days", "7"]);
    assert_eq!(ids(&json["expiringCertificates"]), ["dev-short"]);
    let text = cli.run(&["security", "--days", "7"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("Certificates expiring within 7 days: 1") && text.contains("dev-short"),
        "{text}"
    );
    assert!(text.contains("Devices in crash loops: 1"), "{text}");
    assert!(
        text.contains("Devices never seen since provisioning: 1"),
        "{text}"
    );
    drop(sessions);
}
