//! Debian's stock mosquitto_pub / mosquitto_sub, holding a device's certificate files, speak
//! to Flotilla as seed 003's test steps do: a heartbeat shows in the API and the LED command
//! arrives on `devices/{id}/command`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_e2e::{Server, wait_for};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_publish_heartbeat_and_receive_led_command() -> anyhow::Result<()> {
    let server = Server::start(&[]).await?;
    let jwt = server.user("mosq@example.com").await?;
    let id = server.enroll(&jwt, "ABC123").await?;
    let (cert, key, ca) = id.write_files(server.dir.path())?;
    let port = server.mqtt_port.to_string();
    let tls = |cmd: &mut Command| {
        cmd.args([
            "-h",
            "localhost",
            "-p",
            &port,
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-i",
            "ABC123",
        ])
        .arg("--cafile")
        .arg(&ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key);
    };

    // Seed 003 step 4: simulate a device heartbeat.
    let mut publish = Command::new("mosquitto_pub");
    tls(&mut publish);
    let status = publish
        .args([
            "-t",
            "devices/ABC123/health",
            "-m",
            r#"{"heap":18000,"fw":"1.0.0"}"#,
        ])
        .status()?;
    assert!(status.success(), "mosquitto_pub failed");
    let device = wait_for("heartbeat in the API", Duration::from_secs(10), || async {
        let d = server.device(&jwt, "ABC123").await.ok()?;
        (d["heap"] == 18000 && d["firmwareVersion"] == "1.0.0").then_some(d)
    })
    .await?;
    assert!(device["lastSeen"].is_number());
    // A connection held open (-l: one message per stdin line) shows the device online; closing it
    // is a clean DISCONNECT, which sends no will: the broker's disconnect marks it offline.
    let mut session = Command::new("mosquitto_pub");
    tls(&mut session);
    let mut held = session
        .args(["-t", "devices/ABC123/health", "-l"])
        .stdin(Stdio::piped())
        .spawn()?;
    let mut stdin = held
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    std::io::Write::write_all(&mut stdin, b"{\"heap\":19000,\"fw\":\"1.0.1\"}\n")?;
    std::io::Write::flush(&mut stdin)?;
    wait_for(
        "online while connected",
        Duration::from_secs(10),
        || async {
            let d = server.device(&jwt, "ABC123").await.ok()?;
            (d["heap"] == 19000 && d["online"] == true).then_some(())
        },
    )
    .await?;
    drop(stdin);
    assert!(held.wait()?.success());
    // An external broker reports no disconnects: presence there comes from device messages,
    // wills and the heartbeat timeout.
    if !flotilla_e2e::external_broker::enabled() {
        let gone = wait_for(
            "offline after a clean disconnect",
            Duration::from_secs(10),
            || async {
                let d = server.device(&jwt, "ABC123").await.ok()?;
                (d["online"] == false).then_some(d)
            },
        )
        .await?;
        assert!(
            gone["disconnectReason"]
                .as_str()
                .is_some_and(|r| !r.is_empty()),
            "{gone}"
        );
    }

    // Seed 003 step 5: mosquitto_sub on the command topic, then POST the LED endpoint.
    // stdbuf: mosquitto_sub block-buffers a pipe, and we read its lines as they come.
    let mut subscribe = Command::new("stdbuf");
    subscribe.args(["-oL", "mosquitto_sub"]);
    tls(&mut subscribe);
    let mut sub = subscribe
        .args(["-t", "devices/ABC123/command", "-C", "1", "-W", "20", "-d"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = sub
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let subscribed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.recv().await {
            let done = line.contains("SUBACK");
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        subscribed.ok(),
        Some(true),
        "mosquitto_sub never subscribed: {seen:?}"
    );
    let (s, led) = server
        .call(
            "POST",
            "/api/device/ABC123/led",
            Some(&jwt),
            Some(json!({"state":"ON"})),
        )
        .await?;
    assert_eq!(s, 202, "{led}");
    let command: Value = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.recv().await {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                return Some(v);
            }
        }
        None
    })
    .await?
    .ok_or_else(|| anyhow::anyhow!("no command received"))?;
    assert_eq!(command["name"], "led");
    assert_eq!(command["args"], json!({"state":"ON"}));
    assert_eq!(command["id"], led["commandId"]);
    assert!(command["expires_at"].as_u64().unwrap_or(0) > 0);
    let _ = sub.kill();
    let _ = sub.wait();
    Ok(())
}
