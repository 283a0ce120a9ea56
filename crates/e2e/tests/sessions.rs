//! What waits for a device reaches it when its session starts, and what the server retains
//! outlives the server.

use std::time::Duration;

use flotilla_e2e::Server;
use flotilla_e2e::mqtt::{Outcome, connect, connect_device};
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_before_the_device_subscribed_reaches_it_when_it_subscribes()
-> anyhow::Result<()> {
    if flotilla_e2e::external_broker::embedded_only(
        "the resend follows the broker's subscribe event, which an external broker does not report",
    ) {
        return Ok(());
    }
    let server = Server::start(&[]).await?;
    let jwt = server.user("session@example.com").await?;
    let id = server.enroll(&jwt, "late-sub").await?;
    // Online (its status arrived) but not yet subscribed: the broker has nowhere to deliver.
    let mut s = connect_device(server.mqtt_port, &id).await?;
    s.publish("devices/late-sub/status", r#"{"online":true}"#)
        .await?;
    flotilla_e2e::wait_for("online", Duration::from_secs(5), || async {
        let (_, d) = server
            .call("GET", "/api/device/late-sub", Some(&jwt), None)
            .await
            .ok()?;
        (d["online"] == true).then_some(())
    })
    .await?;
    let (st, cmd) = server
        .call(
            "POST",
            "/api/device/late-sub/commands",
            Some(&jwt),
            Some(json!({"name": "ping"})),
        )
        .await?;
    assert!(st == 200 || st == 201 || st == 202, "{st} {cmd}");
    // The session starts its command channel now: the waiting command is sent, no second
    // online edge needed.
    s.subscribe("devices/late-sub/command").await?;
    let (topic, payload) = s.message(Duration::from_secs(5)).await?;
    assert_eq!(topic, "devices/late-sub/command");
    let wire: serde_json::Value = serde_json::from_slice(&payload)?;
    assert_eq!(wire["id"], cmd["id"], "{wire}");
    // The publish made when the command was created may still be on its way (the downlink
    // queues it): under load it can land after the SUBSCRIBE too, a duplicate the device
    // drops by id. Let it arrive before the next step.
    while let Ok((_, again)) = s.message(Duration::from_millis(800)).await {
        let again: serde_json::Value = serde_json::from_slice(&again)?;
        assert_eq!(again["id"], cmd["id"], "only that command: {again}");
    }
    // A second SUBSCRIBE in the same session does not send it again.
    s.subscribe("devices/late-sub/command").await?;
    assert!(s.message(Duration::from_millis(800)).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_desired_config_survives_a_server_restart() -> anyhow::Result<()> {
    if flotilla_e2e::external_broker::embedded_only(
        "it publishes as a service on the embedded broker's internal listener, and restarts that broker",
    ) {
        return Ok(());
    }
    let mut server = Server::start(&[]).await?;
    let jwt = server.user("retained@example.com").await?;
    let id = server.enroll(&jwt, "cfg-dev").await?;
    let ca = flotilla_pki::CertificateAuthority::load_or_create(&server.data_dir())?;
    let svc = ca.issue_service_certificate("config")?;
    let auth = Some((svc.certificate_pem.as_str(), svc.private_key_pem.as_str()));
    let config = r#"{"telemetry_interval_s":30}"#;
    {
        let Outcome::Connected(mut s) = connect(
            server.mqtt_internal_port,
            &server.ca_pem(),
            auth,
            "svc:config-1",
        )
        .await
        else {
            panic!("service refused on the internal listener");
        };
        assert_eq!(
            s.publish_retained("devices/cfg-dev/config", config).await?,
            PubAckReason::Success
        );
        // A retained command is refused: it would be replayed at every subscribe.
        assert_eq!(
            s.publish_retained("devices/cfg-dev/command", "{}").await?,
            PubAckReason::NotAuthorized
        );
    }
    server.sigkill_and_restart().await?;
    let mut d = connect_device(server.mqtt_port, &id).await?;
    d.subscribe("devices/cfg-dev/config").await?;
    let (topic, payload) = d.message(Duration::from_secs(5)).await?;
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("devices/cfg-dev/config", config.as_bytes())
    );
    Ok(())
}
