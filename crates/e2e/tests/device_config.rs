//! The device twin against the real server and a virtual device (flotilla-agent): the desired
//! configuration reaches the device retained, the device reports what it applied, and the API
//! shows both and whether they differ — also for a device that was offline when it was set.
//! Bad input changes nothing; viewers and strangers cannot set it; every change is audited. A
//! device whose report differs from the desired document is sent it again at its next session.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use flotilla_e2e::{Agent, Cli, Server, wait_for};
use serde_json::{Value, json};

async fn config(server: &Server, jwt: &str) -> Value {
    config_of(server, jwt, "dev-cfg").await
}

async fn config_of(server: &Server, jwt: &str, id: &str) -> Value {
    let (status, body) = server
        .call("GET", &format!("/api/device/{id}/config"), Some(jwt), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

async fn put(server: &Server, jwt: &str, body: Value) -> (u16, Value) {
    server
        .call("PUT", "/api/device/dev-cfg/config", Some(jwt), Some(body))
        .await
        .unwrap()
}

async fn wait_reported(server: &Server, jwt: &str, field: &str, value: Value) -> Value {
    wait_for("the device reports it", Duration::from_secs(30), || async {
        let (status, c) = server
            .call("GET", "/api/device/dev-cfg/config", Some(jwt), None)
            .await
            .ok()?;
        (status == 200 && c["reported"][field] == value && c["inSync"] == true).then_some(c)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_config_reaches_the_device_and_is_reported_back() {
    let mut server = Server::start(&[]).await.unwrap();
    let admin = server.admin("admin@x.io").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&server, dir.path(), &[]).await.unwrap();
    agent.provision(&server, &admin, "dev-cfg").await.unwrap();
    // Before anything is desired: the device's own settings, in sync by definition.
    let first = wait_reported(&server, &admin, "telemetry_interval_s", json!(10)).await;
    assert_eq!(first["desired"], Value::Null);
    assert_eq!(first["reported"]["heartbeat_interval_s"], 30);

    let (status, body) = put(
        &server,
        &admin,
        json!({"telemetry_interval_s": 2, "temp": false}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["published"], true);
    assert_eq!(
        body["desired"],
        json!({"telemetry_interval_s": 2, "temp": false})
    );
    let synced = wait_reported(&server, &admin, "telemetry_interval_s", json!(2)).await;
    assert_eq!(synced["reported"]["temp"], false);
    assert_eq!(synced["reported"]["pot"], true, "fields not asked for stay");
    assert_eq!(synced["differences"], json!([]));

    // Refused, and nothing changes.
    for bad in [
        json!({"telemetry_interval_s": 0}),
        json!({"heartbeat_interval_s": 86_401}),
        json!({"telemetry": 5}),
        json!({}),
        json!({"temp": "off"}),
    ] {
        let (status, body) = put(&server, &admin, bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    assert_eq!(
        config(&server, &admin).await["desired"],
        json!({"telemetry_interval_s": 2, "temp": false})
    );
    let stranger = server.user("other@x.io").await.unwrap();
    let (status, _) = put(&server, &stranger, json!({"temp": true})).await;
    assert_eq!(status, 404, "another user's device is not even confirmed");
    let (status, body) = server
        .call("GET", "/api/device/dev-cfg/config", Some(&stranger), None)
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");

    // Set while the device is off: the broker keeps it retained, across a server restart, and
    // the device applies it when it is back.
    agent.proc.terminate();
    let (status, body) = put(&server, &admin, json!({"heartbeat_interval_s": 7})).await;
    assert_eq!(status, 200, "{body}");
    let pending = config(&server, &admin).await;
    assert_eq!(pending["inSync"], false);
    assert_eq!(pending["differences"], json!(["heartbeat_interval_s"]));
    server.restart().await.unwrap();
    let admin = server.login("admin@x.io", "admin-pass").await.unwrap();
    agent = Agent::start(&server, dir.path(), &[]).await.unwrap();
    let back = wait_reported(&server, &admin, "heartbeat_interval_s", json!(7)).await;
    // The desired document was replaced: telemetry is the device's own again (it had 2 until
    // its reboot reset it to the build's 10).
    assert_eq!(back["desired"], json!({"heartbeat_interval_s": 7}));
    assert_eq!(back["reported"]["telemetry_interval_s"], 10);

    // The CLI sets and shows the same.
    let cli = Cli::new(&server, &server.dir.path().join("session.json"));
    cli.login("admin@x.io", "admin-pass");
    let set = cli.json(&["device", "config", "dev-cfg", "--pot", "off"]);
    assert_eq!(set["desired"], json!({"pot": false}));
    wait_reported(&server, &admin, "pot", json!(false)).await;
    let shown = cli.run(&["device", "config", "dev-cfg"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("in sync"), "{text}");

    let (_, audit) = server
        .call(
            "GET",
            "/api/admin/audit?action=device.config&limit=50",
            Some(&admin),
            None,
        )
        .await
        .unwrap();
    let entries = audit.as_array().unwrap();
    assert_eq!(
        entries.len(),
        3,
        "one per change, none for refusals: {audit}"
    );
    assert!(entries.iter().all(|e| e["target"] == "dev-cfg"));
    drop(agent);
}

/// What reaches a fresh session of `id` on its config topic within a few seconds: each
/// message's payload and whether it came as the broker's retained copy.
async fn config_on_subscribe(
    server: &Server,
    id: &flotilla_e2e::DeviceIdentity,
) -> Vec<(Value, bool)> {
    let mut dev = flotilla_e2e::mqtt::connect_device(server.mqtt_port, id)
        .await
        .unwrap();
    dev.subscribe(&format!("devices/{}/config", id.device_id))
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Ok((_, payload, retained)) = dev.message_with_retain(Duration::from_secs(3)).await {
        got.push((serde_json::from_slice(&payload).unwrap(), retained));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_does_not_run_as_desired_is_sent_the_config_again_when_its_session_starts() {
    if flotilla_e2e::external_broker::embedded_only(
        "the resend follows the broker's session-start event, which an external broker does not report",
    ) {
        return;
    }
    let server = Server::start(&[]).await.unwrap();
    let admin = server.admin("admin@x.io").await.unwrap();
    let id = server.enroll(&admin, "cfg-raw").await.unwrap();
    let desired = json!({"heartbeat_interval_s": 9});
    let (status, body) = server
        .call(
            "PUT",
            "/api/device/cfg-raw/config",
            Some(&admin),
            Some(desired.clone()),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // The device reports that it runs something else: out of sync. At its next session it
    // gets the retained copy and, besides, the server's own resend.
    let mut dev = flotilla_e2e::mqtt::connect_device(server.mqtt_port, &id)
        .await
        .unwrap();
    let other = json!({"online": true, "fw": "1.0.0", "config": {"telemetry_interval_s": 10,
        "heartbeat_interval_s": 30, "pot": true, "switch": true, "temp": true}});
    dev.publish("devices/cfg-raw/status", other.to_string().into_bytes())
        .await
        .unwrap();
    wait_for("the report stored", Duration::from_secs(10), || async {
        let c = config_of(&server, &admin, "cfg-raw").await;
        (c["reported"]["heartbeat_interval_s"] == 30).then_some(())
    })
    .await
    .unwrap();
    drop(dev);
    let out_of_sync = config_on_subscribe(&server, &id).await;
    assert_eq!(
        out_of_sync,
        [(desired.clone(), true), (desired.clone(), false)],
        "the retained copy, then the resend"
    );

    // In sync: the retained copy alone.
    let mut dev = flotilla_e2e::mqtt::connect_device(server.mqtt_port, &id)
        .await
        .unwrap();
    let applied = json!({"online": true, "fw": "1.0.0", "config": {"telemetry_interval_s": 10,
        "heartbeat_interval_s": 9, "pot": true, "switch": true, "temp": true}});
    dev.publish("devices/cfg-raw/status", applied.to_string().into_bytes())
        .await
        .unwrap();
    wait_for("in sync", Duration::from_secs(10), || async {
        (config_of(&server, &admin, "cfg-raw").await["inSync"] == true).then_some(())
    })
    .await
    .unwrap();
    drop(dev);
    assert_eq!(config_on_subscribe(&server, &id).await, [(desired, true)]);
}
