//! Servers on one PostgreSQL database, as replicas run: each signs user tokens with a key of
//! its own and publishes the public half in the database, so a token any of them issued is
//! accepted by all — also by a replica started after its issuer is gone — while a token signed
//! by any other key, or with HMAC over a published public key, is refused.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use flotilla_e2e::Server;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::time::Duration;

fn header_of(token: &str) -> Value {
    let part = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn claims_of(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn es256(key_pem: &str, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_ec_pem(key_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_either_replica_issued_is_accepted_by_both_and_no_other_key_is() {
    let mut a = Server::start_on_postgres(&[]).await.unwrap();
    let from_a = a.admin("admin@x.io").await.unwrap();
    let b = a.start_replica(&[]).await.unwrap();
    let from_b = b.login("admin@x.io", "admin-pass").await.unwrap();
    let (kid_a, kid_b) = (
        header_of(&from_a)["kid"].clone(),
        header_of(&from_b)["kid"].clone(),
    );
    assert_eq!(header_of(&from_a)["alg"], "ES256");
    assert!(kid_a.is_string() && kid_b.is_string() && kid_a != kid_b);
    assert_eq!(
        a.status("GET", "/api/device", Some(&from_b), None)
            .await
            .unwrap(),
        200
    );

    // Forged: a key of the attacker's own under either replica's kid or a new one, HMAC with
    // a replica's public key as the secret (algorithm confusion), and an expired token signed
    // with the replica's real key.
    let claims = claims_of(&from_a);
    let rogue = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .serialize_pem();
    let mut database = a.database.connect().await.unwrap();
    let public_a: String = sqlx::query_scalar("SELECT public_key_pem FROM jwt_keys WHERE kid = $1")
        .bind(kid_a.as_str().unwrap())
        .fetch_one(&mut database)
        .await
        .unwrap();
    let mut hmac = Header::new(Algorithm::HS256);
    hmac.kid = kid_a.as_str().map(String::from);
    let confused = jsonwebtoken::encode(
        &hmac,
        &claims,
        &EncodingKey::from_secret(public_a.as_bytes()),
    )
    .unwrap();
    let key_a = std::fs::read_to_string(a.data_dir().join("jwt.key")).unwrap();
    let mut stale = claims.clone();
    stale["iat"] = json!(999_999_000u64);
    stale["exp"] = json!(1_000_000_000u64);
    let forged = [
        (
            "a rogue key under a's kid",
            es256(&rogue, kid_a.as_str().unwrap(), &claims),
        ),
        (
            "a rogue key under b's kid",
            es256(&rogue, kid_b.as_str().unwrap(), &claims),
        ),
        (
            "a rogue key under a new kid",
            es256(&rogue, "0123456789abcdef", &claims),
        ),
        ("HS256 over a's public key", confused),
        (
            "expired, signed by a",
            es256(&key_a, kid_a.as_str().unwrap(), &stale),
        ),
    ];
    for (what, token) in &forged {
        for server in [&a, &b] {
            assert_eq!(
                server
                    .status("GET", "/api/device", Some(token), None)
                    .await
                    .unwrap(),
                401,
                "{what}"
            );
        }
    }

    // The issuer gone, a replica started after it accepts its token on first sight: the key
    // comes from the database, not from anything the processes shared.
    a.proc.terminate();
    let c = a.start_replica(&[]).await.unwrap();
    assert_eq!(
        c.status("GET", "/api/device", Some(&from_a), None)
            .await
            .unwrap(),
        200
    );
    assert_eq!(
        b.status("GET", "/api/device", Some(&from_a), None)
            .await
            .unwrap(),
        200
    );
}

/// A login from `from` (any 127.0.0.0/8 address works on loopback); the HTTP status.
async fn login_from(server: &Server, from: &str, email: &str, password: &str) -> u16 {
    let client = reqwest::Client::builder()
        .local_address(Some(from.parse::<std::net::IpAddr>().unwrap()))
        .build()
        .unwrap();
    client
        .post(format!("{}/api/auth/login", server.http))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_spread_over_two_replicas_lock_at_the_shared_limit_not_twice_it() {
    let a = Server::start_on_postgres(&[]).await.unwrap();
    a.admin("admin@x.io").await.unwrap();
    let b = a.start_replica(&[]).await.unwrap();
    // Five failures for the admin from one address, alternating replicas: each replica alone
    // has seen at most three, under the per-(account, address) limit of five.
    let guesser = "127.0.0.90";
    for k in 0..5 {
        let server = if k % 2 == 0 { &a } else { &b };
        assert_eq!(
            login_from(server, guesser, "admin@x.io", "wrong").await,
            401,
            "guess {k}"
        );
    }
    // The pair is refused on both, even with the right password ...
    for server in [&a, &b] {
        assert_eq!(
            login_from(server, guesser, "admin@x.io", "admin-pass").await,
            429
        );
    }
    // ... while the admin logs in from elsewhere, on either.
    for server in [&a, &b] {
        assert_eq!(
            login_from(server, "127.0.0.91", "admin@x.io", "admin-pass").await,
            200
        );
    }
    // One refusal audited for the shared window, by whichever replica refused first.
    let admin = a.login("admin@x.io", "admin-pass").await.unwrap();
    let (_, audit) = a
        .call(
            "GET",
            "/api/admin/audit?action=auth.login&limit=100",
            Some(&admin),
            None,
        )
        .await
        .unwrap();
    let refusals = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("too many failures for this account"))
        })
        .count();
    assert_eq!(refusals, 1, "{audit}");
}

/// Replicas `a` and `b` on one PostgreSQL, an admin's token, and which of them leads.
async fn two_replicas_one_leading() -> (Server, Server, String, (bool, bool)) {
    let a = Server::start_on_postgres(&[]).await.unwrap();
    let admin = a.admin("admin@x.io").await.unwrap();
    let b = a.start_replica(&[]).await.unwrap();
    let leaders =
        flotilla_e2e::wait_for("one leader", std::time::Duration::from_secs(20), || async {
            let (la, lb) = (a.leads(&admin).await?, b.leads(&admin).await?);
            (la != lb).then_some((la, lb))
        })
        .await
        .unwrap();
    (a, b, admin, leaders)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_the_sweeps_and_the_other_takes_over_when_it_is_killed() {
    let (mut a, mut b, admin, leaders) = two_replicas_one_leading().await;
    // SIGKILL the leader: no release, the lease has to lapse.
    let survivor = if leaders.0 {
        a.proc.kill_hard();
        &b
    } else {
        b.proc.kill_hard();
        &a
    };
    flotilla_e2e::wait_for(
        "the survivor leads",
        std::time::Duration::from_secs(30),
        || async { survivor.leads(&admin).await.filter(|l| *l) },
    )
    .await
    .unwrap();
    // And it runs the sweeps: a command for a device that never connects expires.
    let (status, body) = survivor
        .call(
            "POST",
            "/api/device/register",
            Some(&admin),
            Some(json!({"deviceId": "sleeper", "name": "s"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, cmd) = survivor
        .call(
            "POST",
            "/api/device/sleeper/commands",
            Some(&admin),
            Some(json!({"name": "ping", "ttlSeconds": 1})),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{cmd}");
    let path = format!(
        "/api/device/sleeper/commands/{}",
        cmd["id"].as_str().unwrap()
    );
    flotilla_e2e::wait_for(
        "the command expired",
        std::time::Duration::from_secs(10),
        || {
            let (path, admin) = (path.clone(), admin.clone());
            async move {
                let (_, c) = survivor.call("GET", &path, Some(&admin), None).await.ok()?;
                (c["state"] == "expired").then_some(())
            }
        },
    )
    .await
    .unwrap();
}

/// A leader stopped cleanly (SIGTERM) gives its lease up on the way out: the row says lapsed
/// the moment the process is gone (a SIGKILLed one leaves it live for up to the 10 s TTL), and
/// the other replica leads at its next renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_cleanly_releases_its_lease_and_the_other_leads_at_once() {
    use sqlx::Row;
    let (mut a, mut b, admin, leaders) = two_replicas_one_leading().await;
    let survivor = if leaders.0 {
        a.proc.terminate();
        &b
    } else {
        b.proc.terminate();
        &a
    };
    let mut conn = a.database.connect().await.unwrap();
    let row = sqlx::query("SELECT expires_at FROM leases WHERE name = 'background'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let expires_at: i64 = row.get(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        expires_at <= now || survivor.leads(&admin).await == Some(true),
        "the stopped leader's lease is still live until {expires_at} (now {now})"
    );
    flotilla_e2e::wait_for(
        "the survivor leads",
        std::time::Duration::from_secs(8),
        || async { survivor.leads(&admin).await.filter(|l| *l) },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_provisioned_and_revoked_through_one_replica_is_known_and_refused_at_the_other() {
    let a = Server::start_on_postgres(&[]).await.unwrap();
    let admin = a.admin("admin@x.io").await.unwrap();
    let b = a.start_replica(&[]).await.unwrap();
    // Provisioned through a after b started: b's gate learns it from the database.
    let id = a.enroll(&admin, "roamer").await.unwrap();
    let within = std::time::Duration::from_secs(15);
    flotilla_e2e::wait_for("b accepts the device", within, || async {
        flotilla_e2e::mqtt::connect_device(b.mqtt_port, &id)
            .await
            .ok()
            .map(|_| ())
    })
    .await
    .unwrap();
    let (status, body) = a
        .call(
            "POST",
            "/api/admin/device/roamer/revoke",
            Some(&admin),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    flotilla_e2e::wait_for("b refuses the revoked device", within, || async {
        flotilla_e2e::mqtt::connect_device(b.mqtt_port, &id)
            .await
            .err()
            .map(|_| ())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_certificate_requests_spread_over_two_replicas_are_refused_at_the_shared_limit() {
    let a = Server::start_on_postgres(&[]).await.unwrap();
    let b = a.start_replica(&[]).await.unwrap();
    let from = "127.0.0.92";
    // 50 refused requests (no valid token) from one address, half on each replica: each alone
    // has seen 25, under the per-address limit of 50.
    for k in 0..50 {
        let server = if k % 2 == 0 { &a } else { &b };
        let status = server
            .sign_csr_from(from, "not-a-token", "dev-x", "garbage")
            .await
            .unwrap();
        assert_eq!(status, 401, "request {k}");
    }
    for server in [&a, &b] {
        let status = server
            .sign_csr_from(from, "not-a-token", "dev-x", "garbage")
            .await
            .unwrap();
        assert_eq!(status, 429);
    }
    // Another address is not refused.
    let status = b
        .sign_csr_from("127.0.0.93", "not-a-token", "dev-x", "garbage")
        .await
        .unwrap();
    assert_eq!(status, 401);
}

/// The words of the rollout's transitions in the audit log, oldest first.
async fn transitions(server: &Server, admin: &str, rollout: &str) -> Vec<String> {
    let all = server.rollout_transitions(admin, rollout).await.unwrap();
    all.into_iter().map(|(_, words)| words).collect()
}

async fn control(server: &Server, admin: &str, id: &str, op: &str) -> (u16, Value) {
    let path = format!("/api/rollouts/{id}/{op}");
    server.call("POST", &path, Some(admin), None).await.unwrap()
}

/// Waits (up to 60 s) until the rollout, as `server` reports it, is in `state`.
async fn wait_state(server: &Server, admin: &str, id: &str, state: &str) -> Value {
    flotilla_e2e::wait_for(
        &format!("rollout {state}"),
        Duration::from_secs(60),
        || async {
            let r = server.rollout(admin, id).await?;
            (r["progress"]["state"] == state).then_some(r)
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_driven_by_the_leader_alone_and_carried_on_by_the_replica_that_takes_over() {
    use flotilla_e2e::release_kit::Kit;
    let tmp = tempfile::tempdir().unwrap();
    let kit = Kit::new(tmp.path());
    let key = kit.public_key();
    let mut a = Server::start_on_postgres(&["--release-key", &key])
        .await
        .unwrap();
    let admin = a.admin("admin@x.io").await.unwrap();
    let mut b = a.start_replica(&["--release-key", &key]).await.unwrap();
    let a_leads = flotilla_e2e::wait_for("one leader", Duration::from_secs(20), || async {
        let (la, lb) = (a.leads(&admin).await?, b.leads(&admin).await?);
        (la != lb).then_some(la)
    })
    .await
    .unwrap();
    let (leader, follower) = if a_leads { (&mut a, &b) } else { (&mut b, &a) };

    // Everything is asked of the replica that does not lead. Ten devices that never connect.
    for i in 0..10 {
        let (status, body) = follower
            .call(
                "POST",
                "/api/device/register",
                Some(&admin),
                Some(json!({"deviceId": format!("away-{i}"), "name": "away"})),
            )
            .await
            .unwrap();
        assert_eq!(status, 201, "{body}");
    }
    let cli = flotilla_e2e::Cli::new(follower, &tmp.path().join("session.json"));
    let login = cli.run(&["login", "--email", "admin@x.io", "--password", "admin-pass"]);
    assert!(login.status.success());
    let image = kit.release("1.1.0", "normal");
    cli.json(&["release", "publish", image.to_str().unwrap()]);
    let r = cli.json(&[
        "rollout",
        "create",
        "1.1.0",
        "--all",
        "--phases",
        "50,100",
        "--wait-timeout",
        "6",
    ]);
    let id = r["id"].as_str().unwrap().to_string();
    flotilla_e2e::wait_for("the leader starts it", Duration::from_secs(10), || async {
        let r = follower.rollout(&admin, &id).await?;
        (r["progress"]["state"] == "running").then_some(())
    })
    .await
    .unwrap();
    // A pause asked of the follower is carried out by the leader.
    let (status, paused) = control(follower, &admin, &id, "pause").await;
    assert_eq!(
        (status, paused["state"].as_str()),
        (200, Some("paused")),
        "{paused}"
    );
    let (status, resumed) = control(follower, &admin, &id, "resume").await;
    assert_eq!(
        (status, resumed["state"].as_str()),
        (200, Some("running")),
        "{resumed}"
    );
    // Asked of the follower, recorded there under the asker; carried out by the leader.
    let (_, audit) = follower
        .call(
            "GET",
            "/api/admin/audit?action=rollout.pause",
            Some(&admin),
            None,
        )
        .await
        .unwrap();
    let results: Vec<&str> = audit
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["target"] == id.as_str()
                && e["actor"].as_str().is_some_and(|a| a.starts_with("user:"))
        })
        .filter_map(|e| e["result"].as_str())
        .collect();
    assert_eq!(results, ["success", "requested"], "newest first: {audit}");

    // SIGKILL the leader mid-phase: the follower takes the lease, restores the rollout in
    // its phase, and (every target skipped, nothing shows the release works) it stops itself.
    leader.proc.kill_hard();
    let stopped = wait_state(follower, &admin, &id, "stopped").await;
    assert_eq!(
        stopped["progress"]["halt"], "no_device_reached",
        "{stopped}"
    );
    assert_eq!(stopped["progress"]["skipped"], 5, "{stopped}");
    assert_eq!(follower.leads(&admin).await, Some(true));
    // The operator overrides; the rest is skipped too and the rollout completes.
    let (status, resumed) = control(follower, &admin, &id, "resume").await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["overrides"], 1, "{resumed}");
    let done = wait_state(follower, &admin, &id, "completed").await;
    assert_eq!(done["progress"]["skipped"], 10, "{done}");
    let t = transitions(follower, &admin, &id).await;
    assert_eq!(
        t,
        [
            "phase 1 running",
            "paused",
            "phase 1 running",
            "stopped itself in phase 1: every device was skipped, none succeeded yet (0 failed, 0 timed out, 0 succeeded, 5 skipped)",
            "phase 1 running",
            "phase 2 running",
            "completed: 0 succeeded, 0 failed, 0 timed out, 10 skipped (offered when they return)"
        ],
        "each transition once, by one leader at a time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_clock_runs_a_minute_ahead_takes_no_live_lease_and_a_dead_one_in_time() {
    let mut a = Server::start_on_postgres(&[]).await.unwrap();
    let admin = a.admin("admin@x.io").await.unwrap();
    flotilla_e2e::wait_for("a leads", Duration::from_secs(20), || async {
        a.leads(&admin).await.filter(|l| *l)
    })
    .await
    .unwrap();
    let skewed = flotilla_e2e::skewed_clock_env("+60s").unwrap();
    let env: Vec<(&str, &str)> = skewed
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let b = a.start_replica_with_env(&[], &env).await.unwrap();
    // B's clock is a minute ahead: the tokens it issues say so.
    let from_b = b.login("admin@x.io", "admin-pass").await.unwrap();
    let ahead =
        claims_of(&from_b)["iat"].as_i64().unwrap() - claims_of(&admin)["iat"].as_i64().unwrap();
    assert!(ahead >= 50, "B's clock is {ahead} s ahead of A's");

    // Every lease expiry is on the database's clock: for one and a half times the lease's
    // time to live, A keeps leading and B never does.
    let until = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < until {
        assert_eq!(a.leads(&admin).await, Some(true), "A lost its live lease");
        assert_eq!(b.leads(&admin).await, Some(false), "B took a live lease");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Killed, A stops renewing; B takes the lease once it lapsed on the database's clock.
    a.proc.kill_hard();
    let killed = std::time::Instant::now();
    flotilla_e2e::wait_for("B leads", Duration::from_secs(30), || async {
        b.leads(&admin).await.filter(|l| *l)
    })
    .await
    .unwrap();
    assert!(
        killed.elapsed() >= Duration::from_secs(5),
        "B took over {:?} after the kill, before A's lease could lapse",
        killed.elapsed()
    );

    // A replica a minute behind waits no longer for a dead holder's lease than the others:
    // on its own clock B's lease would still run for 70 s.
    let behind = flotilla_e2e::skewed_clock_env("-60s").unwrap();
    let env: Vec<(&str, &str)> = behind
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut b = b;
    let c = a.start_replica_with_env(&[], &env).await.unwrap();
    assert_eq!(c.leads(&admin).await, Some(false));
    b.proc.kill_hard();
    flotilla_e2e::wait_for("C leads", Duration::from_secs(25), || async {
        c.leads(&admin).await.filter(|l| *l)
    })
    .await
    .unwrap();
}

async fn on_version(server: &Server, admin: &str, id: &str, version: &str) {
    flotilla_e2e::wait_for(
        &format!("{id} online on {version}"),
        Duration::from_secs(30),
        || async {
            let d = server.device(admin, id).await.ok()?;
            (d["online"] == true && d["firmwareVersion"] == version).then_some(())
        },
    )
    .await
    .unwrap();
}

/// The health gate judges on every heartbeat, whichever replica ingested it: the devices of a
/// health-gated rollout connect to the replica that does not lead, and the leader stops the
/// rollout when the updated one crashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_health_gate_sees_heartbeats_another_replica_ingested() {
    use flotilla_e2e::release_kit::Kit;
    let tmp = tempfile::tempdir().unwrap();
    let kit = Kit::new(tmp.path());
    let key = kit.public_key();
    let a = Server::start_on_postgres(&["--release-key", &key])
        .await
        .unwrap();
    let admin = a.admin("admin@x.io").await.unwrap();
    let b = a.start_replica(&["--release-key", &key]).await.unwrap();
    let a_leads = flotilla_e2e::wait_for("one leader", Duration::from_secs(20), || async {
        let (la, lb) = (a.leads(&admin).await?, b.leads(&admin).await?);
        (la != lb).then_some(la)
    })
    .await
    .unwrap();
    let follower = if a_leads { &b } else { &a };

    let ids = ["hg-0", "hg-1", "hg-2", "hg-3"];
    let (mut devices, mut identities) = (Vec::new(), Vec::new());
    for id in ids {
        let identity = follower.enroll(&admin, id).await.unwrap();
        identities.push(identity.clone());
        let mut dev = flotilla_e2e::mqtt::connect_device(follower.mqtt_port, &identity)
            .await
            .unwrap();
        dev.subscribe(&format!("devices/{id}/ota")).await.unwrap();
        dev.publish(
            &format!("devices/{id}/status"),
            br#"{"online":true,"fw":"1.0.0","hw":"esp32c3"}"#.to_vec(),
        )
        .await
        .unwrap();
        devices.push(dev);
    }
    for id in ids {
        on_version(follower, &admin, id, "1.0.0").await;
    }
    let cli = flotilla_e2e::Cli::new(follower, &tmp.path().join("session.json"));
    let login = cli.run(&["login", "--email", "admin@x.io", "--password", "admin-pass"]);
    assert!(login.status.success());
    let image = kit.release("1.1.0", "normal");
    cli.json(&["release", "publish", image.to_str().unwrap()]);
    let body = json!({
        "version": "1.1.0",
        "target": { "devices": ids },
        "phases": [25, 100],
        "health": { "maxCrashRatio": 2, "minObservedSecs": 25, "minEvents": 3 },
    });
    let (status, created) = follower
        .call("POST", "/api/rollouts", Some(&admin), Some(body))
        .await
        .unwrap();
    assert_eq!(status, 201, "{created}");
    let rollout = created["id"].as_str().unwrap().to_string();

    // The leader publishes offers on its broker connection; with a broker per replica the
    // follower's sends a device its pending offer when its next session starts. The first
    // phase offers it to one of the four.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (updated, offer) = 'found: loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no offer reached a device: FOLLOWER{}",
            follower.log()
        );
        for (k, dev) in devices.iter_mut().enumerate() {
            // Behind one shared broker the offer comes on the open session (a reconnect with a
            // clean session could drop it, and the device, still online, is not re-offered
            // until it next says so); behind the follower's own, at the next session.
            if let Ok((_, payload)) = dev.message(Duration::from_millis(300)).await {
                break 'found (k, serde_json::from_slice::<Value>(&payload).unwrap());
            }
            if follower.broker.is_some() {
                continue;
            }
            *dev = flotilla_e2e::mqtt::connect_device(follower.mqtt_port, &identities[k])
                .await
                .unwrap();
            dev.subscribe(&format!("devices/{}/ota", ids[k]))
                .await
                .unwrap();
            if let Ok((_, payload)) = dev.message(Duration::from_millis(500)).await {
                break 'found (k, serde_json::from_slice::<Value>(&payload).unwrap());
            }
        }
    };
    let id = ids[updated];
    let done = json!({"status": "SUCCESS", "id": offer["id"], "version": "1.1.0"});
    devices[updated]
        .publish(
            &format!("devices/{id}/ota/status"),
            done.to_string().into_bytes(),
        )
        .await
        .unwrap();
    devices[updated]
        .publish(
            &format!("devices/{id}/status"),
            br#"{"online":true,"fw":"1.1.0","hw":"esp32c3"}"#.to_vec(),
        )
        .await
        .unwrap();
    on_version(follower, &admin, id, "1.1.0").await;

    // Heartbeats through the follower only: the updated device crashes at every beat.
    let stopped = follower
        .crash_one_until_rollout_halts(
            &admin,
            &rollout,
            &mut devices,
            &ids,
            updated,
            Duration::from_secs(90),
        )
        .await
        .unwrap();
    assert_eq!(stopped["progress"]["state"], "stopped", "{stopped}");
    assert_eq!(
        stopped["progress"]["halt"], "unhealthy_crashes",
        "{stopped}"
    );
    assert_eq!(stopped["progress"]["succeeded"], 1, "{stopped}");
}
