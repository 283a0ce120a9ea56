//! The broker's access boundary against hostile peers: wills and retained messages where they
//! do not belong, identities on the wrong listener, forged service certificates, and a device
//! that floods. After each refusal the test checks that nothing else changed.

use std::time::Duration;

use flotilla_e2e::mqtt::{Outcome, WillSpec, connect, connect_device, connect_with};
use flotilla_e2e::{DeviceIdentity, Server, wait_for};
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::Value;

async fn snapshot(server: &Server, jwt: &str, device: &str) -> anyhow::Result<Value> {
    server.device_state(jwt, device).await
}

/// Refused by the broker's access decision (CONNACK "not authorized"), not by a timeout, a
/// TLS error or a crash.
fn not_authorized(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Refused(why) if why.contains("NotAuthorized"))
}

fn will(topic: &str, payload: &str, retain: bool) -> Option<WillSpec> {
    Some(WillSpec {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        retain,
    })
}

async fn connect_as(port: u16, id: &DeviceIdentity, w: Option<WillSpec>) -> Outcome {
    connect_with(
        port,
        &id.ca_pem,
        Some((&id.cert_pem, &id.key_pem)),
        &id.device_id,
        w,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_aimed_at_another_devices_topic_refuses_the_connect() -> anyhow::Result<()> {
    // Behind Mosquitto the CONNECT is taken and its ACL must drop the will when it fires: the
    // session is cut at once, and what follows checks that nothing reached dev-b.
    let external = flotilla_e2e::external_broker::enabled();
    let server = Server::start(&[]).await?;
    let jwt = server.user("will@example.com").await?;
    let a = server.enroll(&jwt, "dev-a").await?;
    let b = server.enroll(&jwt, "dev-b").await?;
    let port = server.mqtt_port;

    let mut sb = connect_device(port, &b).await?;
    sb.publish("devices/dev-b/status", r#"{"online":true,"led":"OFF"}"#)
        .await?;
    sb.subscribe("devices/dev-b/command").await?;
    // Stored before the snapshot (an external broker acknowledges before the commit).
    wait_for("dev-b online", Duration::from_secs(10), || async {
        let (_, d) = server
            .call("GET", "/api/device/dev-b", Some(&jwt), None)
            .await
            .ok()?;
        (d["online"] == true && d["led"] == "OFF").then_some(())
    })
    .await?;
    let before = snapshot(&server, &jwt, "dev-b").await?;

    let reboot = r#"{"id":"c-evil","name":"reboot","expires_at":4102444800}"#;
    for (topic, payload) in [
        ("devices/dev-b/command", reboot),
        ("devices/dev-b/status", r#"{"online":false}"#),
        ("devices/dev-b/telemetry", r#"{"seq":1,"pot":1}"#),
        (
            "devices/dev-b/reply",
            r#"{"id":"c-1","status":"succeeded"}"#,
        ),
        ("devices/dev-b/ota/status", r#"{"status":"SUCCESS"}"#),
        ("devices/dev-a/command", reboot),
        ("devices/dev-a/telemetry", r#"{"seq":1}"#),
        ("devices/+/status", r#"{"online":false}"#),
    ] {
        match connect_as(port, &a, will(topic, payload, true)).await {
            Outcome::Connected(session) if external => session.cut(),
            // A wildcard is no topic to publish a will on: a protocol error at CONNECT.
            Outcome::Refused(_) if external && topic.contains('+') => {}
            outcome => assert!(not_authorized(&outcome), "a will on {topic}: {outcome:?}"),
        }
    }
    // On its own status, a will must say "offline": one saying "online" would forge presence.
    // (Mosquitto's ACL cannot look into a payload: there a device may forge its own presence,
    // docs/operations.md.)
    for payload in [r#"{"online":true,"led":"ON"}"#, "garbage"] {
        if external {
            break;
        }
        let outcome = connect_as(port, &a, will("devices/dev-a/status", payload, true)).await;
        assert!(not_authorized(&outcome), "will {payload}: {outcome:?}");
    }
    // The will never reached dev-b, and nothing about dev-b changed.
    assert!(
        sb.message(Duration::from_millis(1500)).await.is_err(),
        "dev-b received a message"
    );
    assert_eq!(snapshot(&server, &jwt, "dev-b").await?, before);

    // A will on its own status is accepted and published when the link drops.
    let Outcome::Connected(mut sa) = connect_as(
        port,
        &a,
        will(
            "devices/dev-a/status",
            r#"{"online":false,"reason":"lost power"}"#,
            true,
        ),
    )
    .await
    else {
        panic!("a will on the device's own status was refused");
    };
    sa.publish("devices/dev-a/status", r#"{"online":true}"#)
        .await?;
    wait_for("dev-a online", Duration::from_secs(5), || async {
        let (_, d) = server
            .call("GET", "/api/device/dev-a", Some(&jwt), None)
            .await
            .ok()?;
        (d["online"] == true).then_some(())
    })
    .await?;
    sa.cut();
    let d = wait_for(
        "dev-a offline by its will",
        Duration::from_secs(10),
        || async {
            let (_, d) = server
                .call("GET", "/api/device/dev-a", Some(&jwt), None)
                .await
                .ok()?;
            (d["online"] == false).then_some(d)
        },
    )
    .await?;
    assert_eq!(d["disconnectReason"], "lost power");
    assert_eq!(snapshot(&server, &jwt, "dev-b").await?, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_publish_outside_status_is_refused() -> anyhow::Result<()> {
    if flotilla_e2e::external_broker::embedded_only(
        "Mosquitto's ACL cannot say which topics may be retained",
    ) {
        return Ok(());
    }
    let server = Server::start(&[]).await?;
    let jwt = server.user("retain@example.com").await?;
    let a = server.enroll(&jwt, "dev-a").await?;
    let mut sa = connect_device(server.mqtt_port, &a).await?;
    sa.publish("devices/dev-a/status", r#"{"online":true,"led":"OFF"}"#)
        .await?;
    let before = snapshot(&server, &jwt, "dev-a").await?;
    for topic in [
        "devices/dev-a/health",
        "devices/dev-a/telemetry",
        "devices/dev-a/reply",
        "devices/dev-a/ota/status",
    ] {
        assert_eq!(
            sa.publish_retained(
                topic,
                r#"{"seq":7,"heap":1,"fw":"1.0.0","id":"c-1","status":"SUCCESS"}"#
            )
            .await?,
            PubAckReason::NotAuthorized,
            "{topic}"
        );
        assert_eq!(
            snapshot(&server, &jwt, "dev-a").await?,
            before,
            "a refused retained publish on {topic} changed something"
        );
    }
    assert_eq!(
        sa.publish_retained("devices/dev-a/status", r#"{"online":true}"#)
            .await?,
        PubAckReason::Success
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_are_refused_on_the_wrong_listener_and_forged_service_names_anywhere()
-> anyhow::Result<()> {
    if flotilla_e2e::external_broker::embedded_only(
        "the test's Mosquitto admits an identity on either listener; topic rights come from its ACL",
    ) {
        return Ok(());
    }
    let server = Server::start(&[]).await?;
    let jwt = server.user("listeners@example.com").await?;
    let a = server.enroll(&jwt, "dev-a").await?;
    let ca_pem = server.ca_pem();
    let mut sa = connect_device(server.mqtt_port, &a).await?;
    sa.publish("devices/dev-a/status", r#"{"online":true,"led":"ON"}"#)
        .await?;
    let before = snapshot(&server, &jwt, "dev-a").await?;
    // A genuine service certificate (as if stolen from the server) is still refused on the
    // device listener.
    let ca = flotilla_pki::CertificateAuthority::load_or_create(&server.data_dir())?;
    let svc = ca.issue_service_certificate("ingest")?;
    let svc_auth = Some((svc.certificate_pem.as_str(), svc.private_key_pem.as_str()));
    let outcome = connect(server.mqtt_port, &ca_pem, svc_auth, "svc:ingest").await;
    assert!(not_authorized(&outcome), "{outcome:?}");
    // On the internal listener it is accepted (that is the server's own path) ...
    assert!(matches!(
        connect(server.mqtt_internal_port, &ca_pem, svc_auth, "svc:ingest-t").await,
        Outcome::Connected(_)
    ));
    // ... but a device certificate is not.
    let outcome = connect(
        server.mqtt_internal_port,
        &ca_pem,
        Some((&a.cert_pem, &a.key_pem)),
        "dev-a",
    )
    .await;
    assert!(not_authorized(&outcome), "{outcome:?}");
    // A `svc:` name signed by another CA is refused on both listeners.
    let rogue_dir = tempfile::tempdir()?;
    let rogue = flotilla_pki::CertificateAuthority::load_or_create(rogue_dir.path())?;
    let forged = rogue.issue_service_certificate("ingest")?;
    for port in [server.mqtt_port, server.mqtt_internal_port] {
        let outcome = connect(
            port,
            &ca_pem,
            Some((&forged.certificate_pem, &forged.private_key_pem)),
            "svc:ingest",
        )
        .await;
        // Refused in the TLS handshake: the chain does not lead to our CA.
        assert!(
            matches!(&outcome, Outcome::Refused(why) if why != "timeout"),
            "{outcome:?}"
        );
    }
    // Nothing about the device changed; the server is still there for it.
    assert_eq!(snapshot(&server, &jwt, "dev-a").await?, before);
    assert_eq!(
        sa.publish("devices/dev-a/status", r#"{"online":true,"led":"ON"}"#)
            .await?,
        PubAckReason::Success
    );
    Ok(())
}

/// The noisy device's budget: large enough that its flood loads the server for a while.
const BURST: u32 = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_flooding_its_topics_is_disconnected_while_others_stay_timely()
-> anyhow::Result<()> {
    if flotilla_e2e::external_broker::embedded_only(
        "per-device publish rate limits are the embedded broker's",
    ) {
        return Ok(());
    }
    let server = Server::start(&[
        "--device-publish-rate",
        "10",
        "--device-publish-burst",
        &BURST.to_string(),
    ])
    .await?;
    let jwt = server.user("flood@example.com").await?;
    let admin = server.admin("flood-admin@example.com").await?;
    let noisy = server.enroll(&jwt, "noisy").await?;
    let calm = server.enroll(&jwt, "calm").await?;
    // The noisy device has the will every device has: presence must still show why the
    // server closed it, not "connection lost".
    let lost = will(
        "devices/noisy/status",
        r#"{"online":false,"reason":"connection lost"}"#,
        true,
    );
    let Outcome::Connected(mut sn) = connect_as(server.mqtt_port, &noisy, lost.clone()).await
    else {
        panic!("noisy device refused");
    };
    let mut sc = connect_device(server.mqtt_port, &calm).await?;
    sn.publish("devices/noisy/status", r#"{"online":true}"#)
        .await?;

    // As fast as the connection takes them, until the broker closes it ...
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = progress.clone();
    let flood = tokio::spawn(async move {
        let mut sent = 0u32;
        while sent < 10_000 {
            let payload = format!(r#"{{"seq":{sent},"pot":1}}"#);
            let queued = tokio::time::timeout(
                Duration::from_secs(5),
                sn.client.publish(
                    "devices/noisy/telemetry",
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                    false,
                    payload,
                ),
            )
            .await;
            if !matches!(queued, Ok(Ok(()))) {
                break;
            }
            sent += 1;
            counter.store(sent, std::sync::atomic::Ordering::Relaxed);
            tokio::task::yield_now().await;
        }
        (sent, sn)
    });
    // ... while the calm device's heartbeats go on being stored (a PUBACK means committed),
    // each within seconds. Counted are those sent while the flood was being sent; their
    // commits queue behind the flood's.
    while progress.load(std::sync::atomic::Ordering::Relaxed) == 0 && !flood.is_finished() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut during = 0;
    while !flood.is_finished() && during < 500 {
        during += 1;
        let reason = tokio::time::timeout(
            Duration::from_secs(5),
            sc.publish(
                "devices/calm/health",
                format!(r#"{{"heap":{during},"fw":"1.0.0"}}"#),
            ),
        )
        .await
        .map_err(|_| anyhow::anyhow!("a calm heartbeat waited over 5 s during the flood"))??;
        assert_eq!(reason, PubAckReason::Success);
    }
    let (sent, mut sn) = flood.await?;
    eprintln!("{during} calm heartbeats sent during a flood of {sent} messages");
    assert!(
        during > 0,
        "no heartbeat was sent during the flood ({sent} flood messages)"
    );
    assert!(
        sn.closed_within(Duration::from_secs(10)).await,
        "a flooding device stayed connected after {sent} messages"
    );
    // Reconnecting at once does not buy a new budget: it is refused for a while.
    let again = connect_as(server.mqtt_port, &noisy, lost).await;
    assert!(not_authorized(&again), "{again:?}");
    // The calm device's heartbeat still reaches the API.
    sc.publish("devices/calm/health", r#"{"heap":4242,"fw":"1.0.0"}"#)
        .await?;
    wait_for("calm heartbeat stored", Duration::from_secs(5), || async {
        let (_, d) = server
            .call("GET", "/api/device/calm", Some(&jwt), None)
            .await
            .ok()?;
        (d["heap"] == 4242).then_some(())
    })
    .await?;
    // Presence and the audit log say why the noisy one went.
    let d = wait_for("noisy offline", Duration::from_secs(10), || async {
        let (_, d) = server
            .call("GET", "/api/device/noisy", Some(&jwt), None)
            .await
            .ok()?;
        (d["online"] == false).then_some(d)
    })
    .await?;
    assert_eq!(d["disconnectReason"], "publish rate limit exceeded");
    let (_, audit) = server
        .call(
            "GET",
            "/api/admin/audit?action=device.disconnect",
            Some(&admin),
            None,
        )
        .await?;
    let entry = &audit[0];
    assert_eq!(
        (entry["target"].as_str(), entry["result"].as_str()),
        (Some("noisy"), Some("throttled")),
        "{audit}"
    );
    // What it stored is bounded by its burst, not by what it sent.
    let (_, t) = server
        .call(
            "GET",
            "/api/device/noisy/telemetry?limit=10000",
            Some(&jwt),
            None,
        )
        .await?;
    let stored = t.as_array().map(Vec::len).unwrap_or(0);
    assert!(
        sent > BURST,
        "only {sent} sent: the flood did not pass the burst"
    );
    // The burst plus what 10/s refills while the test runs.
    assert!(
        stored as u32 <= BURST + 200,
        "{stored} of {sent} flood messages stored"
    );
    Ok(())
}
