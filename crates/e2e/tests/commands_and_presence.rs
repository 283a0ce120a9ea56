//! Commands wait for offline devices and expire; presence follows heartbeats.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use flotilla_e2e::mqtt::connect_device;
use flotilla_e2e::{Server, wait_for};
use serde_json::{Value, json};

async fn command_state(server: &Server, jwt: &str, device: &str, id: &str) -> Option<Value> {
    let (_, c) = server
        .call(
            "GET",
            &format!("/api/device/{device}/commands/{id}"),
            Some(jwt),
            None,
        )
        .await
        .ok()?;
    Some(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_for_an_offline_device_waits_and_is_delivered_when_it_returns() -> anyhow::Result<()>
{
    let mut server = Server::start(&[]).await?;
    let jwt = server.user("cmd@example.com").await?;
    let id = server.enroll(&jwt, "late-dev").await?;

    // The device is offline: the command is stored and stays queued.
    let (s, cmd) = server
        .call(
            "POST",
            "/api/device/late-dev/commands",
            Some(&jwt),
            Some(json!({"name":"led_brightness","args":{"value":40},"ttlSeconds":600})),
        )
        .await?;
    assert_eq!(s, 202, "{cmd}");
    let cmd_id = cmd["id"].as_str().unwrap().to_string();
    assert_eq!(cmd["state"], "queued");

    // A server restart in between loses nothing: the command, the user and the device persist.
    server.restart().await?;
    let jwt = server.login("cmd@example.com", "secret-pass").await?;
    assert_eq!(
        command_state(&server, &jwt, "late-dev", &cmd_id)
            .await
            .unwrap()["state"],
        "queued"
    );
    let mut dev = connect_device(server.mqtt_port, &id).await?;
    assert!(matches!(
        dev.subscribe("devices/late-dev/command").await?,
        rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
    ));
    dev.publish("devices/late-dev/status", br#"{"online":true}"#.to_vec())
        .await?;
    let (topic, payload) = dev.message(Duration::from_secs(10)).await?;
    assert_eq!(topic, "devices/late-dev/command");
    let wire: Value = serde_json::from_slice(&payload)?;
    assert_eq!(
        (wire["id"].as_str(), wire["name"].as_str()),
        (Some(cmd_id.as_str()), Some("led_brightness"))
    );

    dev.publish(
        "devices/late-dev/reply",
        serde_json::to_vec(&json!({"id": cmd_id, "status": "accepted"}))?,
    )
    .await?;
    wait_for("delivered", Duration::from_secs(10), || async {
        (command_state(&server, &jwt, "late-dev", &cmd_id).await?["state"] == "delivered")
            .then_some(())
    })
    .await?;
    dev.publish(
        "devices/late-dev/reply",
        serde_json::to_vec(
            &json!({"id": cmd_id, "status": "succeeded", "result": {"brightness": 40}}),
        )?,
    )
    .await?;
    let done = wait_for("succeeded", Duration::from_secs(10), || async {
        let c = command_state(&server, &jwt, "late-dev", &cmd_id).await?;
        (c["state"] == "succeeded").then_some(c)
    })
    .await?;
    assert_eq!(done["result"], json!({"brightness": 40}));

    // A final state never changes again, and another device cannot touch this command.
    dev.publish(
        "devices/late-dev/reply",
        serde_json::to_vec(&json!({"id": cmd_id, "status": "failed", "error": "late"}))?,
    )
    .await?;
    let other = server.enroll(&jwt, "other-dev").await?;
    let mut o = connect_device(server.mqtt_port, &other).await?;
    o.publish(
        "devices/other-dev/reply",
        serde_json::to_vec(&json!({"id": cmd_id, "status": "failed"}))?,
    )
    .await?;
    // Wait until a later message from this device is stored, so the replies above were processed.
    dev.publish(
        "devices/late-dev/health",
        br#"{"heap":7,"fw":"9.9.9"}"#.to_vec(),
    )
    .await?;
    wait_for(
        "later heartbeat stored",
        Duration::from_secs(10),
        || async { (server.device(&jwt, "late-dev").await.ok()?["heap"] == 7).then_some(()) },
    )
    .await?;
    assert_eq!(
        command_state(&server, &jwt, "late-dev", &cmd_id)
            .await
            .unwrap()["state"],
        "succeeded"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_commands_expire() -> anyhow::Result<()> {
    let server = Server::start(&[]).await?;
    let jwt = server.user("exp@example.com").await?;
    server
        .call(
            "POST",
            "/api/device/register",
            Some(&jwt),
            Some(json!({"deviceId":"sleepy","name":"s"})),
        )
        .await?;
    let (_, cmd) = server
        .call(
            "POST",
            "/api/device/sleepy/commands",
            Some(&jwt),
            Some(json!({"name":"ping","ttlSeconds":1})),
        )
        .await?;
    let cmd_id = cmd["id"].as_str().unwrap().to_string();
    let path = format!("/api/device/sleepy/commands/{cmd_id}");
    // Without a wait, as it stands; a wait past the limit is refused.
    let (status, now) = server.call("GET", &path, Some(&jwt), None).await?;
    assert_eq!(
        (status, now["state"].as_str()),
        (200, Some("queued")),
        "{now}"
    );
    let (status, body) = server
        .call("GET", &format!("{path}?wait=31"), Some(&jwt), None)
        .await?;
    assert_eq!(status, 400, "{body}");
    // A request waiting for it answers once the sweep expired it (before its own deadline:
    // the state says which).
    let (status, expired) = server
        .call("GET", &format!("{path}?wait=20"), Some(&jwt), None)
        .await?;
    assert_eq!(status, 200, "{expired}");
    assert_eq!(expired["state"], "expired", "{expired}");
    assert!(expired["completedAt"].is_number());
    // Someone else's command is not found, waiting or not.
    let other = server.user("other@example.com").await?;
    let (status, _) = server
        .call("GET", &format!("{path}?wait=1"), Some(&other), None)
        .await?;
    assert_eq!(status, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_goes_offline_after_the_heartbeat_timeout() -> anyhow::Result<()> {
    let server = Server::start(&["--heartbeat-timeout", "2"]).await?;
    let jwt = server.user("quiet@example.com").await?;
    let id = server.enroll(&jwt, "quiet-1").await?;
    let mut dev = connect_device(server.mqtt_port, &id).await?;
    dev.publish(
        "devices/quiet-1/health",
        br#"{"heap":1000,"fw":"1.0.0"}"#.to_vec(),
    )
    .await?;
    wait_for("online", Duration::from_secs(5), || async {
        (server.device(&jwt, "quiet-1").await.ok()?["online"] == true).then_some(())
    })
    .await?;
    // Still connected, but silent: no LWT fires, only the timeout can notice.
    let d = wait_for("offline by timeout", Duration::from_secs(6), || async {
        let d = server.device(&jwt, "quiet-1").await.ok()?;
        (d["online"] == false).then_some(d)
    })
    .await?;
    assert_eq!(d["disconnectReason"], "heartbeat timeout");
    // The next heartbeat brings it back.
    dev.publish(
        "devices/quiet-1/health",
        br#"{"heap":1000,"fw":"1.0.0"}"#.to_vec(),
    )
    .await?;
    wait_for("online again", Duration::from_secs(5), || async {
        (server.device(&jwt, "quiet-1").await.ok()?["online"] == true).then_some(())
    })
    .await?;
    Ok(())
}

/// A command published while its device was online but not subscribed (the broker had no one
/// to give it to, as when the publish is lost) still reaches the device: the embedded broker
/// sends it at the SUBSCRIBE, and behind an external broker (scale mode), which reports no
/// SUBSCRIBE, the leader's resender publishes it again while it is not accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_published_to_nobody_reaches_its_online_device_later() -> anyhow::Result<()> {
    let server = Server::start(&[]).await?;
    let jwt = server.user("lost@example.com").await?;
    let id = server.enroll(&jwt, "lost-1").await?;
    let mut dev = connect_device(server.mqtt_port, &id).await?;
    dev.publish(
        "devices/lost-1/health",
        br#"{"heap":1000,"fw":"1.0.0"}"#.to_vec(),
    )
    .await?;
    wait_for("online", Duration::from_secs(10), || async {
        (server.device(&jwt, "lost-1").await.ok()?["online"] == true).then_some(())
    })
    .await?;
    let (s, cmd) = server
        .call(
            "POST",
            "/api/device/lost-1/commands",
            Some(&jwt),
            Some(json!({"name":"ping","ttlSeconds":600})),
        )
        .await?;
    assert_eq!(s, 202, "{cmd}");
    // Published while the device was not subscribed: gone.
    tokio::time::sleep(Duration::from_secs(1)).await;
    dev.subscribe("devices/lost-1/command").await?;
    let (topic, payload) = dev.message(Duration::from_secs(20)).await?;
    assert_eq!(topic, "devices/lost-1/command");
    let wire: Value = serde_json::from_slice(&payload)?;
    assert_eq!(wire["id"], cmd["id"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_command_handlers_answer_while_ingest_is_stalled() -> anyhow::Result<()> {
    // On PostgreSQL, whatever this run's mode: only there can the telemetry table be locked
    // while the commands table stays writable (SQLite has one write lock for all).
    let server = Server::start_on_postgres(&[]).await?;
    let jwt = server.user("stall@example.com").await?;
    let busy = server.enroll(&jwt, "busy").await?;
    let idle = server.enroll(&jwt, "idle").await?;
    let mut busy = connect_device(server.mqtt_port, &busy).await?;
    let mut idle = connect_device(server.mqtt_port, &idle).await?;
    idle.subscribe("devices/idle/command").await?;

    let stall = server.database.stall_telemetry().await?;
    let publishing = tokio::spawn(async move {
        let acked = busy.publish("devices/busy/telemetry", r#"{"seq":1}"#).await;
        (busy, acked)
    });
    server.database.wait_for_a_waiting_query().await?;

    // Ingest waits for its commit; the command is stored, answered and delivered meanwhile.
    let (status, cmd) = server
        .call(
            "POST",
            "/api/device/idle/commands",
            Some(&jwt),
            Some(json!({"name":"ping"})),
        )
        .await?;
    assert_eq!(status, 202, "{cmd}");
    let (topic, _) = idle.message(Duration::from_secs(5)).await?;
    assert_eq!(topic, "devices/idle/command");
    if flotilla_e2e::external_broker::enabled() {
        // An external broker acknowledges at once; the reading waits for its table.
        wait_for("the broker's ack", Duration::from_secs(10), || async {
            publishing.is_finished().then_some(())
        })
        .await?;
        assert!(
            server.database.stored_readings().await?.is_empty(),
            "stored while its table was locked"
        );
    } else {
        assert!(
            !publishing.is_finished(),
            "the telemetry was acknowledged while its table was locked"
        );
    }

    drop(stall);
    let (_busy, acked) = publishing.await?;
    acked?;
    // Stored once the table is free (behind the embedded broker, before the ack came).
    let stored = wait_for("the reading stored", Duration::from_secs(10), || async {
        let stored = server.database.stored_readings().await.ok()?;
        (!stored.is_empty()).then_some(stored)
    })
    .await?;
    assert_eq!(stored, vec![("busy".to_string(), 1)]);
    Ok(())
}
