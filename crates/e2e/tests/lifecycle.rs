//! The whole life of a device with the real binaries: provision through the SoftAP, come
//! online, obey the LED, send telemetry, drop offline when killed, and return after a restart
//! without provisioning again.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use flotilla_e2e::{Agent, Server, wait_for};
use serde_json::{Value, json};

const HEARTBEAT_TIMEOUT_SECS: u64 = 4;

/// device_0070's command `id` once it succeeded (15 s at most).
async fn succeeded(server: &Server, jwt: &str, id: &str) -> anyhow::Result<Value> {
    let path = format!("/api/device/device_0070/commands/{id}");
    wait_for("the command succeeded", Duration::from_secs(15), || async {
        let (_, c) = server.call("GET", &path, Some(jwt), None).await.ok()?;
        (c["state"] == "succeeded").then_some(c)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_lifecycle_end_to_end() -> anyhow::Result<()> {
    let server =
        Server::start(&["--heartbeat-timeout", &HEARTBEAT_TIMEOUT_SECS.to_string()]).await?;
    let jwt = server.user("owner@example.com").await?;
    let token = server.token(&jwt, None).await?;

    let agent_dir = server.dir.path().join("agent");
    let agent_args = [
        "--heartbeat-secs",
        "1",
        "--telemetry-secs",
        "1",
        "--fw-version",
        "1.4.2",
    ];
    let mut agent = Agent::start(&server, &agent_dir, &agent_args).await?;

    // SoftAP: an unprovisioned device offers its networks and waits.
    let scan: Value = reqwest::get(format!("{}/scan", agent.softap))
        .await?
        .json()
        .await?;
    assert!(scan["count"].as_u64().unwrap_or(0) >= 1, "{scan}");
    assert_eq!(agent.status().await?["status"], "provisioning");
    let local: Value = reqwest::get(format!("{}/local-wifi", agent.softap))
        .await?
        .json()
        .await?;
    assert_eq!(local, scan);

    // POST /provision exactly as seed 004 shows it.
    let resp = reqwest::Client::new()
        .post(format!("{}/provision", agent.softap))
        .bearer_auth(&jwt)
        .json(&json!({ "ssid": "flotilla-lab", "password": "1q2w3e4r", "device_id": "device_0070", "provisioning_token": token }))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await?["status"], "ok");

    // Online and the firmware version come with the status message, heap and the rest with
    // the first heartbeat, a separate message that may be stored a moment later.
    let online = wait_for(
        "device online with its firmware version and first heartbeat",
        Duration::from_secs(30),
        || async {
            let d = server.device(&jwt, "device_0070").await.ok()?;
            (d["online"] == true && d["firmwareVersion"] == "1.4.2" && d["heap"].is_number())
                .then_some(d)
        },
    )
    .await?;
    assert_eq!(online["provisioned"], true);
    assert!(
        online["uptime"].is_number() && online["heap"].is_number() && online["rssi"].is_number(),
        "{online}"
    );
    assert_eq!(agent.status().await?["status"], "connected");
    let (_, list) = server.call("GET", "/api/device", Some(&jwt), None).await?;
    assert_eq!(list.as_array().map(Vec::len), Some(1));

    // LED ON: the command is acknowledged and the device reports the new state.
    let (s, led) = server
        .call(
            "POST",
            "/api/device/device_0070/led",
            Some(&jwt),
            Some(json!({"state":"ON"})),
        )
        .await?;
    assert_eq!(s, 202, "{led}");
    let command_id = led["commandId"].as_str().unwrap_or_default().to_string();
    let done = succeeded(&server, &jwt, &command_id).await?;
    assert_eq!(done["result"], json!({"state":"ON"}));
    assert!(done["deliveredAt"].is_number());
    wait_for("LED state ON reported", Duration::from_secs(10), || async {
        let d = server.device(&jwt, "device_0070").await.ok()?;
        (d["led"] == "ON").then_some(())
    })
    .await?;

    // Telemetry is stored with sequence numbers, in order, without gaps or duplicates.
    let readings = wait_for(
        "three telemetry readings",
        Duration::from_secs(15),
        || async {
            let (_, t) = server
                .call(
                    "GET",
                    "/api/device/device_0070/telemetry?limit=100",
                    Some(&jwt),
                    None,
                )
                .await
                .ok()?;
            (t.as_array()?.len() >= 3).then_some(t)
        },
    )
    .await?;
    let seqs: Vec<i64> = readings
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["seq"].as_i64())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] == w[1] + 1),
        "sequence {seqs:?}"
    );
    assert!(readings[0]["temp"].is_number() && readings[0]["pot"].is_number());

    // A reboot command: the reply is stored, the device restarts once (when the broker has
    // acknowledged the reply, well before its 30 s fallback) and comes back.
    let boots = |agent: &Agent| agent.log().matches(" booted").count();
    assert_eq!(boots(&agent), 1);
    let (s, reboot) = server
        .call(
            "POST",
            "/api/device/device_0070/commands",
            Some(&jwt),
            Some(json!({"name":"reboot","ttlSeconds":600})),
        )
        .await?;
    assert_eq!(s, 202, "{reboot}");
    let reboot_id = reboot["id"].as_str().unwrap().to_string();
    let asked = std::time::Instant::now();
    let done = succeeded(&server, &jwt, &reboot_id).await?;
    assert_eq!(done["result"], json!({"rebooting": true}));
    wait_for("the agent restarts", Duration::from_secs(20), || {
        let n = boots(&agent);
        async move { (n == 2).then_some(()) }
    })
    .await?;
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "{:?}",
        asked.elapsed()
    );
    wait_for(
        "back online after the reboot",
        Duration::from_secs(30),
        || async {
            let d = server.device(&jwt, "device_0070").await.ok()?;
            (d["online"] == true && d["uptime"].as_u64()? < 10).then_some(())
        },
    )
    .await?;
    // The command was delivered again at most as the broker sees fit; it ran once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(boots(&agent), 2, "{}", agent.log());

    // Killed without a goodbye: offline within the heartbeat timeout (the LWT is faster).
    agent.proc.kill_hard();
    let killed_at = std::time::Instant::now();
    let offline = wait_for(
        "device offline",
        Duration::from_secs(HEARTBEAT_TIMEOUT_SECS + 3),
        || async {
            let d = server.device(&jwt, "device_0070").await.ok()?;
            (d["online"] == false).then_some(d)
        },
    )
    .await?;
    assert!(killed_at.elapsed() <= Duration::from_secs(HEARTBEAT_TIMEOUT_SECS + 3));
    assert!(offline["disconnectReason"].is_string(), "{offline}");

    // Restart from the same flash: back online with no second certificate.
    let agent = Agent::start(&server, &agent_dir, &agent_args).await?;
    wait_for("device back online", Duration::from_secs(30), || async {
        let d = server.device(&jwt, "device_0070").await.ok()?;
        (d["online"] == true).then_some(())
    })
    .await?;
    assert_eq!(agent.status().await?["status"], "connected");
    let admin = server.admin("root@example.com").await?;
    let (_, audit) = server
        .call(
            "GET",
            "/api/admin/audit?action=certificate.issue&limit=100",
            Some(&admin),
            None,
        )
        .await?;
    let issued: Vec<&Value> = audit
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["result"] == "success")
        .collect();
    assert_eq!(
        issued.len(),
        1,
        "only the first boot asked for a certificate: {audit}"
    );
    // The agent's log spans both runs: only the first one ever waited in AP mode.
    assert_eq!(agent.log().matches("AP mode: waiting").count(), 1);
    Ok(())
}
