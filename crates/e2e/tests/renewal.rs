//! Certificate renewal (issue 9): a device renews over mTLS with the certificate it holds and a
//! CSR for a fresh key; the old serial stays valid until the new one has connected, then it is
//! refused. One test drives the real agent on short-lived certificates; one plays a device by
//! hand and a hostile one: no certificate, an old one, a blocked device, a bad CSR, renewing
//! too often.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use flotilla_e2e::mqtt::connect_device;
use flotilla_e2e::{Agent, DeviceIdentity, Server, external_broker, wait_for};
use serde_json::{Value, json};

/// Whether the broker refuses this identity as superseded: the embedded broker's gate at
/// CONNECT ("not authorized", not a timeout or a TLS error), an external Mosquitto at the TLS
/// handshake once broker-sync put the serial in its CRL.
async fn refused_by_the_broker(port: u16, id: &DeviceIdentity) -> bool {
    let want = if external_broker::enabled() {
        "revoked"
    } else {
        "notauthorized"
    };
    connect_device(port, id)
        .await
        .err()
        .is_some_and(|e| format!("{e:#}").to_lowercase().contains(want))
}

/// Asserts that the broker refuses this identity now: the embedded gate at once, an external
/// broker within broker-sync's next passes (it runs on its own clock).
async fn assert_refused(port: u16, id: &DeviceIdentity) {
    if external_broker::enabled() {
        wait_refused(port, id).await;
    } else {
        assert!(
            refused_by_the_broker(port, id).await,
            "the old serial is accepted"
        );
    }
}

/// Waits until the broker refuses this identity.
async fn wait_refused(port: u16, id: &DeviceIdentity) {
    wait_for(
        "the old serial refused",
        Duration::from_secs(20),
        || async { refused_by_the_broker(port, id).await.then_some(()) },
    )
    .await
    .unwrap();
}

/// How a promotion is audited: behind the embedded broker the server sees the new certificate
/// connect; behind an external one the device confirms it.
fn promoted_by() -> &'static str {
    if external_broker::enabled() {
        "(confirmed)"
    } else {
        "(connected)"
    }
}

fn client(server: &Server, id: Option<&DeviceIdentity>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem().as_bytes()).unwrap())
        .timeout(Duration::from_secs(20));
    if let Some(id) = id {
        b = b.identity(
            reqwest::Identity::from_pem(format!("{}\n{}", id.cert_pem, id.key_pem).as_bytes())
                .unwrap(),
        );
    }
    b.build().unwrap()
}

/// `POST /renew` presenting `id` with a CSR for a fresh key: the status, the body and the
/// new identity if one was issued.
async fn renew(
    server: &Server,
    id: Option<&DeviceIdentity>,
    device_id: &str,
    csr_override: Option<&str>,
) -> (u16, Value, Option<DeviceIdentity>, Option<String>) {
    let (key_pem, csr) = flotilla_pki::device_key_and_csr(device_id).unwrap();
    let resp = client(server, id)
        .post(format!("{}/renew", server.backend_url()))
        .json(&json!({ "csr": csr_override.unwrap_or(&csr) }))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let renewed = body["certificate"]["content"]
        .as_str()
        .map(|cert| DeviceIdentity {
            device_id: device_id.into(),
            cert_pem: cert.into(),
            key_pem,
            ca_pem: server.ca_pem(),
        });
    (status, body, renewed, retry_after)
}

async fn confirm(server: &Server, id: &DeviceIdentity) -> (u16, Value) {
    let resp = client(server, Some(id))
        .post(format!("{}/renew/confirm", server.backend_url()))
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

fn serial(id: &DeviceIdentity) -> String {
    flotilla_pki::certificate_identity(&id.cert_pem).unwrap().0
}

async fn audit(server: &Server, admin: &str, action: &str) -> Vec<Value> {
    let (_, body) = server
        .call(
            "GET",
            &format!("/api/admin/audit?action={action}&limit=100"),
            Some(admin),
            None,
        )
        .await
        .unwrap();
    body.as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_certificate_keeps_connecting_and_its_old_serial_is_then_refused() {
    // Certificates live 40 s (+5 s back-dated): at two thirds the agent renews ~25 s in.
    let server = Server::start(&["--device-cert-validity", "40"])
        .await
        .unwrap();
    let admin = server.admin("admin@x.io").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&server, dir.path(), &["--heartbeat-secs", "2"])
        .await
        .unwrap();
    agent.provision(&server, &admin, "dev-renew").await.unwrap();
    wait_for("device online", Duration::from_secs(30), || async {
        let d = server.device(&admin, "dev-renew").await.ok()?;
        (d["online"] == true).then_some(())
    })
    .await
    .unwrap();
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    let first = DeviceIdentity {
        device_id: "dev-renew".into(),
        cert_pem: read("device.pem"),
        key_pem: read("device.key"),
        ca_pem: server.ca_pem(),
    };

    let promoted = wait_for(
        "renewed certificate in use",
        Duration::from_secs(60),
        || async {
            let entries = audit(&server, &admin, "certificate.promote").await;
            entries.into_iter().next()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
    let now = DeviceIdentity {
        cert_pem: read("device.pem"),
        key_pem: read("device.key"),
        ..first.clone()
    };
    assert_ne!(
        serial(&now),
        serial(&first),
        "the agent holds the new certificate"
    );
    assert_ne!(now.key_pem, first.key_pem, "for a key made on the device");
    assert_eq!(promoted["actor"], "device:dev-renew");
    // The oldest promotion (the list is newest first) replaced the first certificate.
    let promotions = audit(&server, &admin, "certificate.promote").await;
    let detail = promotions.last().unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        detail.ends_with(&format!("replaces {} {}", serial(&first), promoted_by())),
        "{detail}"
    );
    let renewals = audit(&server, &admin, "certificate.renew").await;
    assert!(
        renewals.iter().any(|e| e["result"] == "success"),
        "{renewals:?}"
    );
    assert!(!dir.path().join("next.pem").exists());
    assert!(!dir.path().join("next.key").exists());

    // Still connected and reporting, with the new certificate; the old one is refused.
    let since = server.device(&admin, "dev-renew").await.unwrap()["lastSeen"]
        .as_i64()
        .unwrap();
    wait_for(
        "a heartbeat after the renewal",
        Duration::from_secs(20),
        || async {
            let d = server.device(&admin, "dev-renew").await.ok()?;
            (d["online"] == true && d["lastSeen"].as_i64()? > since).then_some(())
        },
    )
    .await
    .unwrap();
    assert_refused(server.mqtt_port, &first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_is_refused_to_strangers_old_certificates_blocked_devices_and_bad_csrs() {
    // One renewal per quarter of this life (15 min).
    let mut server = Server::start(&["--device-cert-validity", "3600"])
        .await
        .unwrap();
    let admin = server.admin("admin@x.io").await.unwrap();
    let a = server.enroll(&admin, "dev-a").await.unwrap();

    // No client certificate: who is asking is unknown.
    let (status, _, _, _) = renew(&server, None, "dev-a", None).await;
    assert_eq!(status, 401);
    // A CSR that is not one, or too large: refused, and nothing was issued.
    let (status, body, _, _) = renew(&server, Some(&a), "dev-a", Some("not a csr")).await;
    assert_eq!(status, 400, "{body}");
    let big = "A".repeat(9 * 1024);
    let (status, _, _, _) = renew(&server, Some(&a), "dev-a", Some(&big)).await;
    assert_eq!(status, 400);

    let (status, body, b, _) = renew(&server, Some(&a), "dev-a", None).await;
    assert_eq!(status, 200, "{body}");
    let b = b.unwrap();
    let (_, cn) = flotilla_pki::certificate_identity(&b.cert_pem).unwrap();
    assert_eq!(cn, "dev-a");
    // Again at once: too soon, with when to come back.
    let (status, _, _, retry_after) = renew(&server, Some(&a), "dev-a", None).await;
    assert_eq!(status, 429);
    let secs: u64 = retry_after.unwrap().parse().unwrap();
    assert!((1..=900).contains(&secs), "{secs}");

    // Until the new one is used, both are valid, across a restart.
    server.restart().await.unwrap();
    drop(connect_device(server.mqtt_port, &a).await.unwrap());
    // The renewed one connects: that completes the renewal (behind an external broker, its
    // confirmation does), and the old one is refused.
    let session = connect_device(server.mqtt_port, &b).await.unwrap();
    if external_broker::enabled() {
        let (status, body) = confirm(&server, &b).await;
        assert_eq!((status, body["promoted"].clone()), (200, json!(true)));
    }
    wait_refused(server.mqtt_port, &a).await;
    drop(session);
    let (status, body) = confirm(&server, &b).await;
    assert_eq!((status, body["promoted"].clone()), (200, json!(false)));
    // The superseded certificate cannot renew or confirm any more.
    let (status, _, _, _) = renew(&server, Some(&a), "dev-a", None).await;
    assert_eq!(status, 403);
    let (status, _) = confirm(&server, &a).await;
    assert_eq!(status, 403);
    server.restart().await.unwrap();
    assert_refused(server.mqtt_port, &a).await;
    drop(connect_device(server.mqtt_port, &b).await.unwrap());

    // With an external broker the server never sees the connection: the device confirms.
    let c = server.enroll(&admin, "dev-c").await.unwrap();
    let (status, _, d, _) = renew(&server, Some(&c), "dev-c", None).await;
    assert_eq!(status, 200);
    let d = d.unwrap();
    let (status, body) = confirm(&server, &d).await;
    assert_eq!(
        (status, body["promoted"].clone()),
        (200, json!(true)),
        "{body}"
    );
    assert_refused(server.mqtt_port, &c).await;
    let promotions = audit(&server, &admin, "certificate.promote").await;
    let details: Vec<&str> = promotions
        .iter()
        .map(|e| e["detail"].as_str().unwrap())
        .collect();
    assert_eq!(details.len(), 2, "{details:?}");
    assert!(
        details.iter().any(|d| d.ends_with("(confirmed)")),
        "{details:?}"
    );
    assert!(
        details.iter().any(|d| d.ends_with(promoted_by())),
        "{details:?}"
    );

    // A blocked device renews nothing.
    let e = server.enroll(&admin, "dev-e").await.unwrap();
    let (status, body) = server
        .call("POST", "/api/admin/device/dev-e/block", Some(&admin), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _, _, _) = renew(&server, Some(&e), "dev-e", None).await;
    assert_eq!(status, 403);
    let failures: Vec<Value> = audit(&server, &admin, "certificate.renew")
        .await
        .into_iter()
        .filter(|e| e["result"] == "failure")
        .collect();
    assert!(
        failures.len() >= 5,
        "every refusal is audited: {failures:?}"
    );
}
