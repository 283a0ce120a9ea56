//! The device twin against the real server and a virtual device (flotilla-agent): the desired
//! configuration reaches the device retained, the device reports what it applied, and the API
//! shows both and whether they differ — also for a device that was offline when it was set.
//! Bad input changes nothing; viewers and strangers cannot set it; every change is audited.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use flotilla_e2e::{Agent, Cli, Server, wait_for};
use serde_json::{Value, json};

async fn config(server: &Server, jwt: &str) -> Value {
    let (status, body) = server
        .call("GET", "/api/device/dev-cfg/config", Some(jwt), None)
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
