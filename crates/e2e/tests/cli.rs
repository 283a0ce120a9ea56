//! The `flotilla` CLI against a real server: tables for people, JSON for scripts, exit codes.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

use flotilla_e2e::release_kit::signed_manifest;
use flotilla_e2e::{Cli, Server, bin};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_drives_the_api_with_tables_json_and_exit_codes() -> anyhow::Result<()> {
    let server = Server::start(&[]).await?;
    server.user("cli@example.com").await?;
    let cli = Cli::new(&server, &server.dir.path().join("session.json"));

    // Not logged in: exit code 3 and a hint.
    let out = cli.run(&["device", "list"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("flotilla login"));

    // Wrong password: 3; right password: the session file is owner-only.
    assert_eq!(
        cli.run(&["login", "--email", "cli@example.com", "--password", "nope"])
            .status
            .code(),
        Some(3)
    );
    assert!(
        cli.run(&[
            "login",
            "--email",
            "cli@example.com",
            "--password",
            "secret-pass"
        ])
        .status
        .success()
    );
    // The password from standard input, from the environment; with neither and no terminal,
    // a clear error rather than a hang.
    let login = ["login", "--email", "cli@example.com"];
    let stdin_login = [&login[..], &["--password-stdin"]].concat();
    assert!(
        cli.run_with(&stdin_login, &[], "secret-pass\n")
            .status
            .success()
    );
    assert_eq!(
        cli.run_with(&stdin_login, &[], "nope\n").status.code(),
        Some(3)
    );
    assert!(
        cli.run_with(&login, &[("FLOTILLA_PASSWORD", "secret-pass")], "")
            .status
            .success()
    );
    let no_password = cli.run(&login);
    assert_eq!(no_password.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&no_password.stderr).contains("FLOTILLA_PASSWORD"),
        "{}",
        String::from_utf8_lossy(&no_password.stderr)
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cli.session)?.permissions());
    assert_eq!(mode & 0o777, 0o600);

    let d = cli.json(&["device", "register", "cli-1", "--name", "Desk lamp"]);
    assert_eq!(d["deviceId"], "cli-1");
    let table = String::from_utf8(cli.run(&["device", "list"]).stdout)?;
    assert!(
        table.starts_with("DEVICE")
            && table.contains("cli-1")
            && table.contains("Desk lamp")
            && table.contains("offline"),
        "{table}"
    );
    assert_eq!(cli.json(&["device", "show", "cli-1"])["name"], "Desk lamp");
    assert_eq!(cli.run(&["device", "show", "nope"]).status.code(), Some(4));

    let token = cli.json(&["token", "create", "--device", "cli-1", "--ttl", "60"]);
    assert!(token["token"].as_str().unwrap().starts_with("fpt_"));

    let led = cli.json(&["led", "cli-1", "on"]);
    assert_eq!(led["led"], "ON");
    let cmd = cli.json(&["command", "cli-1", "led_brightness", r#"{"value":40}"#]);
    assert_eq!(cmd["state"], "queued");
    let bad = cli.run(&["command", "cli-1", "led_brightness", r#"{"value":400}"#]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("0-100"));
    assert_eq!(
        cli.run(&["command", "cli-1", "ping", "{not json"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(cli.run(&["led", "cli-1", "purple"]).status.code(), Some(2));

    // Audit is for admins: 3 for an operator, a table for an admin.
    assert_eq!(cli.run(&["audit"]).status.code(), Some(3));
    server.admin("cli-admin@example.com").await?;
    assert!(
        cli.run(&[
            "login",
            "--email",
            "cli-admin@example.com",
            "--password",
            "admin-pass"
        ])
        .status
        .success()
    );
    let audit = String::from_utf8(cli.run(&["audit", "--limit", "100"]).stdout)?;
    assert!(
        audit.contains("command.create") && audit.contains("device.register"),
        "{audit}"
    );
    let blocked = cli.json(&["device", "block", "cli-1"]);
    assert_eq!(blocked["blocked"], true);
    Ok(())
}

#[test]
fn release_keys_sign_and_verify_offline() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(bin("flotilla"))
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    assert!(
        run(&["release", "keygen", "--out", "release"])
            .status
            .success()
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("release.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // A second keygen never overwrites the key.
    assert!(
        !run(&["release", "keygen", "--out", "release"])
            .status
            .success()
    );

    let firmware = dir.path().join("fw.bin");
    let built = Command::new(bin("flotilla-agent"))
        .args(["image", "--version", "1.3.0", "--hardware", "esp32c3"])
        .args(["--security-counter", "2", "--size", "150000", "--out"])
        .arg(&firmware)
        .output()
        .unwrap();
    assert!(built.status.success(), "{built:?}");
    let size = std::fs::metadata(&firmware).unwrap().len();
    let hash = String::from_utf8(run(&["release", "hash", "fw.bin"]).stdout).unwrap();
    assert_eq!(hash.trim().len(), 64);
    let signed = run(&[
        "release",
        "sign",
        "fw.bin",
        "--version",
        "1.3.0",
        "--hardware",
        "esp32c3",
        "--security-counter",
        "2",
    ]);
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    let inner = signed_manifest(&dir.path().join("fw.bin"));
    assert_eq!(
        (
            inner["version"].as_str(),
            inner["sha256"].as_str(),
            inner["size"].as_u64()
        ),
        (Some("1.3.0"), Some(hash.trim()), Some(size))
    );
    assert!(
        run(&["release", "verify", "fw.bin", "fw.bin.manifest.json"])
            .status
            .success()
    );
    let refused = run(&[
        "release",
        "sign",
        "fw.bin",
        "--version",
        "1.3",
        "--hardware",
        "esp32c3",
    ]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--version 1.3 disagrees"),
        "{refused:?}"
    );

    // One flipped bit in the image, or a key that did not sign it: refused.
    let mut bytes = std::fs::read(&firmware).unwrap();
    bytes[777] ^= 1;
    std::fs::write(&firmware, &bytes).unwrap();
    assert!(
        !run(&["release", "verify", "fw.bin", "fw.bin.manifest.json"])
            .status
            .success()
    );
    bytes[777] ^= 1;
    std::fs::write(&firmware, &bytes).unwrap();
    assert!(
        run(&["release", "keygen", "--out", "other"])
            .status
            .success()
    );
    assert!(
        !run(&[
            "release",
            "verify",
            "fw.bin",
            "fw.bin.manifest.json",
            "--public-key",
            "other.pub"
        ])
        .status
        .success()
    );
}

/// `--wait` holds the CLI until the device answered: 0 when it succeeded, 1 with the state
/// when it did not answer in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_with_wait_exits_with_the_devices_answer() -> anyhow::Result<()> {
    let server = Server::start(&[]).await?;
    let jwt = server.user("wait@example.com").await?;
    let tmp = tempfile::tempdir()?;
    let cli = Cli::new(&server, &tmp.path().join("session.json"));
    let login = cli.run(&[
        "login",
        "--email",
        "wait@example.com",
        "--password",
        "secret-pass",
    ]);
    anyhow::ensure!(login.status.success(), "{login:?}");
    let id = server.enroll(&jwt, "wait-1").await?;

    // Nobody answers: still queued when the wait ends.
    let unanswered = cli.run(&["command", "wait-1", "ping", "--wait", "1"]);
    assert_eq!(unanswered.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unanswered.stderr).contains("still queued after 1 s"),
        "{unanswered:?}"
    );

    let mut device = flotilla_e2e::mqtt::connect_device(server.mqtt_port, &id).await?;
    device.subscribe("devices/wait-1/command").await?;
    let waiting = {
        let cli = cli.clone();
        tokio::task::spawn_blocking(move || cli.run(&["led", "wait-1", "on", "--wait", "20"]))
    };
    // The first command was delivered when the device subscribed; answer the LED one.
    loop {
        let (_, payload) = device.message(std::time::Duration::from_secs(10)).await?;
        let command: Value = serde_json::from_slice(&payload)?;
        if command["name"] == "led" {
            let reply = serde_json::json!({"id": command["id"], "status": "succeeded", "result": {"state": "ON"}});
            device
                .publish("devices/wait-1/reply", reply.to_string())
                .await?;
            break;
        }
    }
    let answered = waiting.await?;
    assert!(answered.status.success(), "{answered:?}");
    assert!(
        String::from_utf8_lossy(&answered.stdout).contains("succeeded"),
        "{answered:?}"
    );
    Ok(())
}
