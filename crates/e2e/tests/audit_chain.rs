//! The audit log's hash chain against the real server and CLI: `flotilla audit verify` passes
//! on the log as written, `flotilla audit export` writes it out and sets the mark retention
//! removes below, and one row edited in the database makes `verify` fail naming that record.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use flotilla_e2e::{Cli, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_one_audit_row_in_the_database_makes_audit_verify_fail_at_it() {
    let server = Server::start(&[]).await.unwrap();
    let admin = server.admin("admin@x.io").await.unwrap();
    for id in ["dev-a", "dev-b"] {
        server.enroll(&admin, id).await.unwrap();
        let path = format!("/api/admin/device/{id}/block");
        for _ in 0..2 {
            let (status, body) = server
                .call("POST", &path, Some(&admin), None)
                .await
                .unwrap();
            assert_eq!(status, 200, "{body}");
        }
    }
    let cli = Cli::new(&server, &server.dir.path().join("session.json"));
    cli.login("admin@x.io", "admin-pass");
    let ca = server.dir.path().join("pinned-ca.pem");
    std::fs::write(&ca, server.ca_pem()).unwrap();

    let intact = cli.json(&["audit", "verify", "--ca", ca.to_str().unwrap()]);
    assert_eq!(intact["intact"], true, "{intact}");
    let records = intact["records"].as_u64().unwrap();
    assert!(records >= 8, "{intact}");
    let text = cli.run(&["audit", "verify"]);
    assert!(text.status.success());
    assert!(String::from_utf8_lossy(&text.stdout).contains("audit chain intact"));

    // Export: one JSON line per record; the mark reaches the server (and is audited).
    let out = server.dir.path().join("audit.jsonl");
    let exported = cli.json(&["audit", "export", "--out", out.to_str().unwrap()]);
    let lines = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        lines.lines().count() as u64,
        exported["records"].as_u64().unwrap()
    );
    assert!(exported["records"].as_u64().unwrap() >= records);
    let (_, newest) = server
        .call(
            "GET",
            "/api/admin/audit?action=audit.export&limit=1",
            Some(&admin),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        newest[0]["detail"],
        format!("through seq {}", exported["lastSeq"])
    );
    // An existing file is never overwritten.
    let again = cli.run(&["audit", "export", "--out", out.to_str().unwrap()]);
    assert!(!again.status.success());

    // Someone with the database rewrites who blocked dev-a.
    let mut db = server.database.connect().await.unwrap();
    let (victim,): (i64,) = sqlx::query_as(
        "SELECT MIN(seq) FROM audit WHERE action = 'admin.device.block' AND target = 'dev-a'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    sqlx::query("UPDATE audit SET actor = 'user:999' WHERE seq = $1")
        .bind(victim)
        .execute(&mut db)
        .await
        .unwrap();
    let broken = cli.run(&["audit", "verify", "--ca", ca.to_str().unwrap()]);
    assert_eq!(broken.status.code(), Some(1));
    let said = String::from_utf8_lossy(&broken.stderr);
    assert!(
        said.contains(&format!("record seq {victim} ")) && said.contains("altered"),
        "{said}"
    );

    // Non-admins see none of it.
    let operator = server.user("op@x.io").await.unwrap();
    for path in ["/api/admin/audit/chain", "/api/admin/audit/checkpoints"] {
        let (status, _) = server
            .call("GET", path, Some(&operator), None)
            .await
            .unwrap();
        assert_eq!(status, 403, "{path}");
    }
    let (status, _) = server
        .call(
            "POST",
            "/api/admin/audit/exported",
            Some(&operator),
            Some(serde_json::json!({ "after": 0, "through": 1 })),
        )
        .await
        .unwrap();
    assert_eq!(status, 403);
}
