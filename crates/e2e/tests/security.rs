//! Security properties, each against the real server, broker and TLS stack.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use flotilla_e2e::mqtt::{Outcome, connect, connect_device};
use flotilla_e2e::{Server, wait_for};
use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};
use serde_json::json;

fn refused_sub(code: SubscribeReasonCode) -> bool {
    !matches!(code, SubscribeReasonCode::Success(_))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_tokens_are_single_use_bound_and_expiring() -> anyhow::Result<()> {
    let server = Server::start(&[]).await?;
    let jwt = server.user("tok@example.com").await?;

    // Reuse: the second CSR with the same token is refused.
    let token = server.token(&jwt, None).await?;
    let (_, csr) = flotilla_pki::device_key_and_csr("reuse-1")?;
    assert_eq!(server.sign_csr(&token, "reuse-1", &csr).await?.0, 200);
    assert_eq!(server.sign_csr(&token, "reuse-2", &csr).await?.0, 401);

    // Bound to a device id: another id is refused and the token survives for the right one.
    let bound = server.token(&jwt, Some("bound-1")).await?;
    assert_eq!(server.sign_csr(&bound, "bound-2", &csr).await?.0, 403);
    assert_eq!(server.sign_csr(&bound, "bound-1", &csr).await?.0, 200);

    // Expiry.
    let (s, b) = server
        .call(
            "POST",
            "/api/provisioning/tokens",
            Some(&jwt),
            Some(json!({"ttlSeconds": 1})),
        )
        .await?;
    assert_eq!(s, 201);
    let short = b["token"].as_str().unwrap_or_default().to_string();
    let expires_at = b["expiresAt"].as_i64().unwrap_or(0);
    wait_for(
        "the token's expiry time",
        Duration::from_secs(5),
        || async {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_millis() as i64;
            (now > expires_at).then_some(())
        },
    )
    .await?;
    assert_eq!(server.sign_csr(&short, "late-1", &csr).await?.0, 401);

    // A bad CSR does not consume the token.
    let fresh = server.token(&jwt, None).await?;
    assert_eq!(
        server
            .sign_csr(
                &fresh,
                "x-1",
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----"
            )
            .await?
            .0,
        400
    );
    assert_eq!(server.sign_csr(&fresh, "x-1", &csr).await?.0, 200);

    // 20 concurrent uses of one token: exactly one certificate.
    let race = server.token(&jwt, None).await?;
    let attempts = (0..20).map(|i| {
        let (server, race, csr) = (&server, race.clone(), csr.clone());
        async move {
            server
                .sign_csr(&race, &format!("race-{i}"), &csr)
                .await
                .map(|r| r.0)
        }
    });
    let statuses: Vec<u16> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        19,
        "{statuses:?}"
    );

    // Every attempt is audited.
    let admin = server.admin("sec-admin@example.com").await?;
    let (_, audit) = server
        .call(
            "GET",
            "/api/admin/audit?action=certificate.issue&limit=1000",
            Some(&admin),
            None,
        )
        .await?;
    assert_eq!(audit.as_array().map_or(0, Vec::len), 27, "{audit}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_enforces_identity_and_topic_isolation() -> anyhow::Result<()> {
    let server = Server::start(&[]).await?;
    let jwt = server.user("iso@example.com").await?;
    let a = server.enroll(&jwt, "dev-a").await?;
    let b = server.enroll(&jwt, "dev-b").await?;
    let port = server.mqtt_port;

    let mut sa = connect_device(port, &a).await?;
    // Publishing: own upward channels only.
    assert_eq!(
        sa.publish("devices/dev-a/health", r#"{"heap":1,"fw":"1.0.0"}"#)
            .await?,
        PubAckReason::Success
    );
    for topic in [
        "devices/dev-b/health",
        "devices/dev-a/command",
        "devices/dev-b/telemetry",
        "$SYS/brokers",
        "other/topic",
    ] {
        assert_eq!(
            sa.publish(topic, "{}").await?,
            PubAckReason::NotAuthorized,
            "{topic}"
        );
    }
    // Subscribing: own downward channels by exact name only.
    assert!(!refused_sub(sa.subscribe("devices/dev-a/command").await?));
    let foreign = [
        "devices/dev-b/command",
        "devices/+/command",
        "devices/#",
        "#",
        "devices/dev-a/#",
        "$share/g/devices/dev-b/command",
        "$share/g/devices/+/health",
        // The group name an earlier server used for its ingest.
        "$share/flotilla/devices/+/telemetry",
        "$SYS/#",
    ];
    if flotilla_e2e::external_broker::enabled() {
        drop(sa);
        return isolation_behind_an_external_broker(&server, &jwt, &a, &b, &foreign).await;
    }
    for filter in foreign {
        assert!(refused_sub(sa.subscribe(filter).await?), "{filter}");
    }

    // A client id different from the certificate's CN.
    assert!(matches!(
        connect(port, &a.ca_pem, Some((&a.cert_pem, &a.key_pem)), "dev-b").await,
        Outcome::Refused(_)
    ));
    refuses_strangers(port, &a).await?;
    // A device may not claim a service identity.
    assert!(matches!(
        connect(
            port,
            &a.ca_pem,
            Some((&a.cert_pem, &a.key_pem)),
            "svc:ingest"
        )
        .await,
        Outcome::Refused(_)
    ));

    // A blocked device is kicked within 5 s and refused afterwards; unblocked, it returns.
    let mut sb = connect_device(port, &b).await?;
    let admin = server.admin("broker-admin@example.com").await?;
    let (s, r) = server
        .call("POST", "/api/admin/device/dev-b/block", Some(&admin), None)
        .await?;
    assert_eq!((s, r["blocked"].as_bool()), (200, Some(true)));
    assert!(
        sb.closed_within(Duration::from_secs(5)).await,
        "blocked device still connected after 5 s"
    );
    assert!(matches!(
        connect(port, &b.ca_pem, Some((&b.cert_pem, &b.key_pem)), "dev-b").await,
        Outcome::Refused(_)
    ));
    let (_, r) = server
        .call("POST", "/api/admin/device/dev-b/block", Some(&admin), None)
        .await?;
    assert_eq!(r["blocked"], false);
    assert!(matches!(
        connect(port, &b.ca_pem, Some((&b.cert_pem, &b.key_pem)), "dev-b").await,
        Outcome::Connected(_)
    ));

    // Re-provisioning revokes the old certificate.
    let old = server.enroll(&jwt, "dev-c").await?;
    let _new = server.enroll(&jwt, "dev-c").await?;
    assert!(matches!(
        connect(
            port,
            &old.ca_pem,
            Some((&old.cert_pem, &old.key_pem)),
            "dev-c"
        )
        .await,
        Outcome::Refused(_)
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_rejects_forged_tokens_and_enforces_roles_and_ownership() -> anyhow::Result<()> {
    let server = Server::start(&[]).await?;
    let alice = server.user("alice@example.com").await?;
    let bob = server.user("bob@example.com").await?;
    assert_eq!(
        server
            .status(
                "POST",
                "/api/device/register",
                Some(&alice),
                Some(json!({"deviceId":"alice-1","name":"A"}))
            )
            .await?,
        201
    );

    // Forged JWTs: alg none, tampered payload, expired, garbage, missing.
    let parts: Vec<&str> = alice.split('.').collect();
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let alg_none = format!("{none_header}.{}.", parts[1]);
    let mut claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1])?)?;
    claims["role"] = json!("admin");
    claims["sub"] = json!("2");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?),
        parts[2]
    );
    // Signed with the server's own key (jwt.key) under its kid: only the expiry is wrong.
    let key = std::fs::read_to_string(server.data_dir().join("jwt.key"))?;
    let header: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0])?)?;
    let mut signed = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    signed.kid = header["kid"].as_str().map(String::from);
    claims["exp"] = json!(1_000_000_000u64);
    claims["iat"] = json!(999_999_000u64);
    let expired = jsonwebtoken::encode(
        &signed,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(key.as_bytes())?,
    )?;
    for (what, token) in [
        ("alg none", alg_none.as_str()),
        ("tampered", &tampered),
        ("expired", &expired),
        ("garbage", "abc.def.ghi"),
    ] {
        assert_eq!(
            server
                .status("GET", "/api/device", Some(token), None)
                .await?,
            401,
            "{what}"
        );
    }
    assert_eq!(server.status("GET", "/api/device", None, None).await?, 401);

    // User B can neither see nor control user A's device, and cannot claim its id.
    assert_eq!(
        server
            .status("GET", "/api/device/alice-1", Some(&bob), None)
            .await?,
        404
    );
    assert_eq!(
        server
            .status(
                "POST",
                "/api/device/alice-1/led",
                Some(&bob),
                Some(json!({"state":"ON"}))
            )
            .await?,
        404
    );
    assert_eq!(
        server
            .status(
                "POST",
                "/api/device/alice-1/commands",
                Some(&bob),
                Some(json!({"name":"reboot"}))
            )
            .await?,
        404
    );
    assert_eq!(
        server
            .status("GET", "/api/device/alice-1/telemetry", Some(&bob), None)
            .await?,
        404
    );
    assert_eq!(
        server
            .status(
                "POST",
                "/api/device/register",
                Some(&bob),
                Some(json!({"deviceId":"alice-1","name":"mine"}))
            )
            .await?,
        409
    );
    assert_eq!(
        server
            .status(
                "POST",
                "/api/provisioning/tokens",
                Some(&bob),
                Some(json!({"deviceId":"alice-1"}))
            )
            .await?,
        409
    );
    let (_, bobs) = server.call("GET", "/api/device", Some(&bob), None).await?;
    assert_eq!(bobs, json!([]));

    // Non-admins cannot use admin endpoints.
    for path in ["/api/admin/users", "/api/admin/devices", "/api/admin/audit"] {
        assert_eq!(
            server.status("GET", path, Some(&alice), None).await?,
            403,
            "{path}"
        );
    }
    assert_eq!(
        server
            .status("POST", "/api/admin/device/alice-1/block", Some(&bob), None)
            .await?,
        403
    );

    // A viewer reads but cannot command, register or create tokens.
    let admin = server.admin("root@example.com").await?;
    let (_, users) = server
        .call("GET", "/api/admin/users", Some(&admin), None)
        .await?;
    let alice_id = users
        .as_array()
        .into_iter()
        .flatten()
        .find(|u| u["email"] == "alice@example.com")
        .and_then(|u| u["id"].as_i64())
        .unwrap_or(0);
    let (s, _) = server
        .call(
            "POST",
            &format!("/api/admin/user/{alice_id}/role"),
            Some(&admin),
            Some(json!({"role":"viewer"})),
        )
        .await?;
    assert_eq!(s, 200);
    assert_eq!(
        server
            .status("GET", "/api/device/alice-1", Some(&alice), None)
            .await?,
        200
    );
    assert_eq!(
        server
            .status(
                "POST",
                "/api/device/alice-1/commands",
                Some(&alice),
                Some(json!({"name":"ping"}))
            )
            .await?,
        403
    );
    assert_eq!(
        server
            .status(
                "POST",
                "/api/device/alice-1/led",
                Some(&alice),
                Some(json!({"state":"ON"}))
            )
            .await?,
        403
    );
    assert_eq!(
        server
            .status(
                "POST",
                "/api/provisioning/tokens",
                Some(&alice),
                Some(json!({}))
            )
            .await?,
        403
    );

    // A blocked user is locked out at once, even with a valid token.
    let bob_id = users
        .as_array()
        .into_iter()
        .flatten()
        .find(|u| u["email"] == "bob@example.com")
        .and_then(|u| u["id"].as_i64())
        .unwrap_or(0);
    assert_eq!(
        server
            .status(
                "POST",
                &format!("/api/admin/user/{bob_id}/block"),
                Some(&admin),
                None
            )
            .await?,
        200
    );
    assert_eq!(
        server
            .status("GET", "/api/device", Some(&bob), None)
            .await?,
        403
    );

    // Failed logins are rate-limited per account, and audited.
    for _ in 0..5 {
        assert_eq!(
            server
                .status(
                    "POST",
                    "/api/auth/login",
                    None,
                    Some(json!({"email":"carol@example.com","password":"wrong"}))
                )
                .await?,
            401
        );
    }
    server
        .call(
            "POST",
            "/api/auth/register",
            None,
            Some(json!({"username":"c","email":"carol@example.com","password":"right-pass"})),
        )
        .await?;
    assert_eq!(
        server
            .status(
                "POST",
                "/api/auth/login",
                None,
                Some(json!({"email":"carol@example.com","password":"right-pass"}))
            )
            .await?,
        429
    );
    let (_, audit) = server
        .call(
            "GET",
            "/api/admin/audit?action=auth.login&limit=100",
            Some(&admin),
            None,
        )
        .await?;
    assert!(
        audit
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["result"] == "failure")
            .count()
            >= 6
    );
    Ok(())
}

/// [`broker_enforces_identity_and_topic_isolation`] behind Mosquitto: it grants a SUBSCRIBE to
/// another device's topics (SUBACK 0) and filters at delivery, takes the client id from the
/// certificate whatever the CONNECT says, and refuses at the TLS handshake what has no
/// certificate from the CA. Blocking and revocation there: revocation.rs.
async fn isolation_behind_an_external_broker(
    server: &Server,
    jwt: &str,
    a: &flotilla_e2e::DeviceIdentity,
    b: &flotilla_e2e::DeviceIdentity,
    foreign: &[&str],
) -> anyhow::Result<()> {
    let port = server.mqtt_port;
    let mut sb = connect_device(port, b).await?;
    sb.subscribe("devices/dev-b/command").await?;
    // dev-a connects claiming dev-b's client id, and a service's: it is dev-a all the same, so
    // dev-b's session stays (its command reaches it below) and the ingest's is untouched.
    for claimed in ["dev-b", "svc:server-ingest-r1"] {
        let outcome = connect(port, &a.ca_pem, Some((&a.cert_pem, &a.key_pem)), claimed).await;
        assert!(
            matches!(outcome, Outcome::Connected(_)),
            "{claimed}: {outcome:?}"
        );
    }
    let mut sa = connect_device(port, a).await?;
    for filter in foreign {
        let granted = sa.subscribe(filter).await?;
        assert!(
            !refused_sub(granted),
            "Mosquitto grants {filter}: {granted:?}"
        );
    }
    sb.publish("devices/dev-b/health", r#"{"heap":2,"fw":"1.0.0"}"#)
        .await?;
    // Mosquitto gave dev-a its shared subscriptions; had one joined the ingest's group, it
    // would be handed every other reading (and its ACL drop them): all of them are stored.
    let readings = 20;
    for seq in 1..=readings {
        let reading = json!({"seq": seq, "pot": 1, "switch": true, "temp": 20.5});
        assert_eq!(
            sb.publish("devices/dev-b/telemetry", reading.to_string())
                .await?,
            PubAckReason::Success
        );
    }
    wait_for(
        "every reading dev-b sent stored",
        Duration::from_secs(10),
        || async {
            let (_, t) = server
                .call(
                    "GET",
                    "/api/device/dev-b/telemetry?limit=100",
                    Some(jwt),
                    None,
                )
                .await
                .ok()?;
            (t.as_array()?.len() == readings).then_some(())
        },
    )
    .await?;
    let (s, _) = server
        .call(
            "POST",
            "/api/device/dev-b/commands",
            Some(jwt),
            Some(json!({"name": "ping"})),
        )
        .await?;
    assert_eq!(s, 202);
    // The positive control: dev-b's health reached the server and its command reached dev-b.
    wait_for("dev-b's health stored", Duration::from_secs(10), || async {
        let d = server.device(jwt, "dev-b").await.ok()?;
        (d["heap"] == 2).then_some(())
    })
    .await?;
    let (topic, _) = sb.message(Duration::from_secs(10)).await?;
    assert_eq!(topic, "devices/dev-b/command");
    assert!(
        sa.message(Duration::from_millis(1500)).await.is_err(),
        "dev-a received another device's message"
    );
    // dev-a's own session was open all along.
    assert_eq!(
        sa.publish("devices/dev-a/health", r#"{"heap":3,"fw":"1.0.0"}"#)
            .await?,
        PubAckReason::Success
    );
    refuses_strangers(port, a).await?;
    flotilla_e2e::external_broker::embedded_only(
        "blocking and the CONNECT gate's refusals are the embedded broker's (revocation.rs tests blocking on Mosquitto)",
    );
    Ok(())
}

/// The broker on `port` refuses `a`'s CN without a client certificate, and with a
/// certificate from another CA.
async fn refuses_strangers(port: u16, a: &flotilla_e2e::DeviceIdentity) -> anyhow::Result<()> {
    assert!(matches!(
        connect(port, &a.ca_pem, None, &a.device_id).await,
        Outcome::Refused(_)
    ));
    let other_ca_dir = tempfile::tempdir()?;
    let rogue_ca = flotilla_pki::CertificateAuthority::load_or_create(other_ca_dir.path())?;
    let (rogue_key, rogue_csr) = flotilla_pki::device_key_and_csr(&a.device_id)?;
    let rogue = rogue_ca.sign_device_csr(&rogue_csr, &a.device_id)?;
    let outcome = connect(
        port,
        &a.ca_pem,
        Some((&rogue.certificate_pem, &rogue_key)),
        &a.device_id,
    )
    .await;
    assert!(
        matches!(outcome, Outcome::Refused(_)),
        "another CA: {outcome:?}"
    );
    Ok(())
}
