//! Retention against the real server: rows older than their kind's age go, a device's readings
//! beyond its cap go, exported audit records older than the audit age go with a signed
//! checkpoint in their place (so `flotilla audit verify` still passes), and nothing else goes;
//! `/api/admin/stats` shows the sizes and what each kind's runs removed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use flotilla_e2e::{Cli, Server, wait_for};

const DAY_MS: i64 = 86_400_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_what_it_should_and_nothing_else() {
    let server = Server::start(&[
        "--retention-interval",
        "1",
        "--retention-batch",
        "7",
        "--retain-telemetry",
        "1d",
        "--retain-telemetry-per-device",
        "50",
        "--retain-ota-events",
        "1d",
        "--retain-commands",
        "1d",
        "--retain-tokens",
        "1d",
        "--retain-dead-letters",
        "1d",
        "--retain-audit",
        "2s",
    ])
    .await
    .unwrap();
    let admin = server.admin("admin@x.io").await.unwrap();
    let admin_id = server.user_id(&admin, "admin@x.io").await.unwrap();
    for id in ["dev-a", "dev-b"] {
        server.enroll(&admin, id).await.unwrap();
    }
    let (old, fresh) = (now_ms() - 2 * DAY_MS, now_ms());
    let mut db = server.database.connect().await.unwrap();
    // dev-a: 10 readings two days old, 10 fresh; dev-b: 60 fresh, 10 over its cap.
    for seq in 1..=20i64 {
        let at = if seq <= 10 { old } else { fresh };
        sqlx::query("INSERT INTO telemetry (device_id, seq, received_at) VALUES ('dev-a', $1, $2)")
            .bind(seq)
            .bind(at)
            .execute(&mut db)
            .await
            .unwrap();
    }
    for seq in 1..=60i64 {
        sqlx::query("INSERT INTO telemetry (device_id, seq, received_at) VALUES ('dev-b', $1, $2)")
            .bind(seq)
            .bind(fresh)
            .execute(&mut db)
            .await
            .unwrap();
    }
    for (i, at) in [old, fresh].into_iter().enumerate() {
        sqlx::query(
            "INSERT INTO ota_events (update_id, at, status) VALUES ('u', $1, 'downloading')",
        )
        .bind(at)
        .execute(&mut db)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO dead_letters (topic, payload, reason, at) VALUES ('t', $1, 'r', $2)",
        )
        .bind(b"x".to_vec())
        .bind(at)
        .execute(&mut db)
        .await
        .unwrap();
        sqlx::query("INSERT INTO provisioning_tokens (token_hash, owner_id, expires_at, created_at) VALUES ($1, $2, $3, 0)")
            .bind(format!("test-token-{i}"))
            .bind(admin_id)
            .bind(at)
            .execute(&mut db)
            .await
            .unwrap();
    }
    // Finished two days ago, finished now, and queued two days ago (open: kept).
    for (id, state, completed) in [
        ("c-old", "succeeded", Some(old)),
        ("c-new", "failed", Some(fresh)),
        ("c-open", "queued", None),
    ] {
        sqlx::query("INSERT INTO commands (id, device_id, name, args, state, created_at, expires_at, completed_at) VALUES ($1, 'dev-a', 'ping', '{}', $2, $3, $4, $5)")
            .bind(id)
            .bind(state)
            .bind(old)
            .bind(fresh + DAY_MS)
            .bind(completed)
            .execute(&mut db)
            .await
            .unwrap();
    }

    // The audit log: exported through K, then more records.
    let cli = Cli::new(&server, &server.dir.path().join("session.json"));
    cli.login("admin@x.io", "admin-pass");
    let out = server.dir.path().join("audit.jsonl");
    let exported = cli.json(&["audit", "export", "--out", out.to_str().unwrap()]);
    let through = exported["lastSeq"].as_i64().unwrap();
    for _ in 0..2 {
        let (status, _) = server
            .call("POST", "/api/admin/device/dev-a/block", Some(&admin), None)
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    let later: Vec<i64> = sqlx::query_scalar("SELECT seq FROM audit WHERE seq > $1 ORDER BY seq")
        .bind(through)
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert!(
        later.len() >= 3,
        "the export and two blocks were audited: {later:?}"
    );

    let count = async |db: &mut sqlx::AnyConnection, sql: &str| -> i64 {
        sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
    };
    wait_for("old rows removed", Duration::from_secs(30), || {
        let url = server.database.url();
        async move {
            let mut db = {
                use sqlx::Connection;
                sqlx::AnyConnection::connect(&url).await.ok()?
            };
            let left: i64 = sqlx::query_scalar(
                "SELECT (SELECT COUNT(*) FROM telemetry WHERE device_id = 'dev-a' AND seq <= 10) \
                 + (SELECT COUNT(*) FROM telemetry WHERE device_id = 'dev-b' AND seq <= 10) \
                 + (SELECT COUNT(*) FROM ota_events WHERE at < $1) \
                 + (SELECT COUNT(*) FROM dead_letters WHERE at < $1) \
                 + (SELECT COUNT(*) FROM provisioning_tokens WHERE token_hash = 'test-token-0') \
                 + (SELECT COUNT(*) FROM commands WHERE id = 'c-old') \
                 + (SELECT COUNT(*) FROM audit WHERE seq <= $2)",
            )
            .bind(fresh - DAY_MS)
            .bind(through)
            .fetch_one(&mut db)
            .await
            .ok()?;
            (left == 0).then_some(())
        }
    })
    .await
    .unwrap();

    // What each kind removed is recorded after it (the audit kind after its audit record).
    wait_for(
        "the audit removal recorded",
        Duration::from_secs(30),
        || async {
            let (_, stats) = server
                .call("GET", "/api/admin/stats", Some(&admin), None)
                .await
                .ok()?;
            let done = stats["storage"]["retention"]
                .as_array()?
                .iter()
                .any(|r| r["kind"] == "audit" && r["totalDeleted"].as_i64() == Some(through));
            done.then_some(())
        },
    )
    .await
    .unwrap();

    // Nothing else went.
    assert_eq!(
        count(
            &mut db,
            "SELECT COUNT(*) FROM telemetry WHERE device_id = 'dev-a'"
        )
        .await,
        10
    );
    assert_eq!(
        count(
            &mut db,
            "SELECT COUNT(*) FROM telemetry WHERE device_id = 'dev-b'"
        )
        .await,
        50
    );
    assert_eq!(count(&mut db, "SELECT COUNT(*) FROM ota_events").await, 1);
    assert_eq!(count(&mut db, "SELECT COUNT(*) FROM dead_letters").await, 1);
    assert_eq!(
        count(
            &mut db,
            "SELECT COUNT(*) FROM provisioning_tokens WHERE token_hash = 'test-token-1'"
        )
        .await,
        1
    );
    let commands: Vec<String> = sqlx::query_scalar("SELECT id FROM commands ORDER BY id")
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert_eq!(commands, ["c-new", "c-open"]);
    let kept: Vec<i64> = sqlx::query_scalar("SELECT seq FROM audit WHERE seq > $1 ORDER BY seq")
        .bind(through)
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert!(
        later.iter().all(|seq| kept.contains(seq)),
        "unexported records were removed: {later:?} -> {kept:?}"
    );

    // The chain still verifies from the first kept record, through the signed checkpoint.
    let ca = server.dir.path().join("pinned-ca.pem");
    std::fs::write(&ca, server.ca_pem()).unwrap();
    let verified = cli.json(&["audit", "verify", "--ca", ca.to_str().unwrap()]);
    assert_eq!(verified["intact"], true, "{verified}");
    assert_eq!(
        verified["firstSeq"].as_i64().unwrap(),
        through + 1,
        "{verified}"
    );
    let (_, checkpoints) = server
        .call("GET", "/api/admin/audit/checkpoints", Some(&admin), None)
        .await
        .unwrap();
    // Records written across a run's cutoff may go in two runs, each with its checkpoint.
    let last_removal = checkpoints
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["removed"].as_i64() > Some(0))
        .filter_map(|c| c["seq"].as_i64())
        .max();
    assert_eq!(last_removal, Some(through), "{checkpoints}");
    let (_, audited) = server
        .call(
            "GET",
            "/api/admin/audit?action=audit.retention",
            Some(&admin),
            None,
        )
        .await
        .unwrap();
    assert!(!audited.as_array().unwrap().is_empty(), "{audited}");

    // The figures.
    let (status, stats) = server
        .call("GET", "/api/admin/stats", Some(&admin), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let storage = &stats["storage"];
    assert_eq!(storage["telemetryRows"], 60, "{stats}");
    assert!(storage["databaseBytes"].as_i64().unwrap() > 0);
    let total = |kind: &str| {
        storage["retention"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["kind"] == kind)
            .map(|r| r["totalDeleted"].as_i64().unwrap())
    };
    assert_eq!(total("telemetry"), Some(10), "{stats}");
    assert_eq!(total("telemetryPerDevice"), Some(10), "{stats}");
    assert_eq!(total("finishedCommands"), Some(1), "{stats}");
    assert_eq!(total("audit"), Some(through), "{stats}");

    // The head is signed once the server has checked the chain into it; the CLI takes a head
    // it printed earlier back as --expect.
    let head_signed = || async {
        let (_, v) = server
            .call(
                "GET",
                "/api/admin/audit/chain?after=0&limit=10000",
                Some(&admin),
                None,
            )
            .await
            .ok()?;
        let last = v.as_array()?.last()?.clone();
        let (_, c) = server
            .call("GET", "/api/admin/audit/checkpoints", Some(&admin), None)
            .await
            .ok()?;
        let signed = c
            .as_array()?
            .iter()
            .any(|c| c["removed"] == 0 && c["seq"] == last["seq"] && c["hash"] == last["hash"]);
        signed.then(|| format!("{}:{}", last["seq"], last["hash"].as_str().unwrap()))
    };
    let head = wait_for("the head signed", Duration::from_secs(30), head_signed)
        .await
        .unwrap();
    let ca_arg = ca.to_str().unwrap();
    let with_head = cli.json(&["audit", "verify", "--ca", ca_arg, "--expect", &head]);
    assert_eq!(with_head["intact"], true, "{with_head}");

    // Someone with the database cuts the newest record: the signed head catches it.
    let (head_seq, _) = head.split_once(':').unwrap();
    let head_seq: i64 = head_seq.parse().unwrap();
    sqlx::query("DELETE FROM audit WHERE seq = $1")
        .bind(head_seq)
        .execute(&mut db)
        .await
        .unwrap();
    let cut = cli.run(&["audit", "verify", "--ca", ca_arg]);
    assert_eq!(cut.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&cut.stderr).contains("removed from its end"),
        "{}",
        String::from_utf8_lossy(&cut.stderr)
    );
    // ... and deletes the signed head too. The server, checking before it signs the head
    // again, refuses and audits it; the noted head still catches the cut.
    sqlx::query("DELETE FROM audit_checkpoints WHERE removed = 0")
        .execute(&mut db)
        .await
        .unwrap();
    wait_for(
        "the broken chain reported",
        Duration::from_secs(30),
        || async {
            let (_, audited) = server
                .call(
                    "GET",
                    "/api/admin/audit?action=audit.chain_broken",
                    Some(&admin),
                    None,
                )
                .await
                .ok()?;
            (!audited.as_array()?.is_empty()).then_some(())
        },
    )
    .await
    .unwrap();
    let (_, c) = server
        .call("GET", "/api/admin/audit/checkpoints", Some(&admin), None)
        .await
        .unwrap();
    assert!(
        c.as_array().unwrap().iter().all(|c| c["removed"] != 0),
        "a broken chain's head was signed: {c}"
    );
    let noted = cli.run(&["audit", "verify", "--ca", ca_arg, "--expect", &head]);
    assert_eq!(noted.status.code(), Some(1));
}
