//! Signed OTA end to end with the real binaries: releases signed offline with the CLI and
//! published to a server that checks them; agents that boot real images from their A/B slots;
//! a staged rollout that completes; a release that crashes at boot rolled back by every device
//! it reached while the rollout stops itself; a release that cannot reach the broker rolled
//! back; a download through a link that keeps dropping, resumed with Range until it completes.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::PathBuf;
use std::time::Duration;

use flotilla_e2e::proxy::CuttingProxy;
use flotilla_e2e::release_kit::Kit;
use flotilla_e2e::{Agent, Cli, Server, wait_for};
use serde_json::{Value, json};

/// A server trusting a fresh release key, its admin, and the CLI logged in as that admin.
async fn rig(
    extra: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<(tempfile::TempDir, Kit, Server, String, Cli)> {
    let tmp = tempfile::tempdir()?;
    let kit = Kit::new(tmp.path());
    let public_key = kit.public_key();
    let mut args = vec!["--release-key", &public_key];
    args.extend_from_slice(extra);
    let server = Server::start_with_env(&args, env).await?;
    let jwt = server.admin("admin@example.com").await?;
    let cli = Cli::new(&server, &tmp.path().join("session.json"));
    let login = cli.run(&[
        "login",
        "--email",
        "admin@example.com",
        "--password",
        "admin-pass",
    ]);
    anyhow::ensure!(login.status.success(), "CLI login failed");
    Ok((tmp, kit, server, jwt, cli))
}

fn agent_args(kit: &Kit) -> Vec<String> {
    [
        "--fw-version",
        "1.0.0",
        "--release-key",
        &kit.public_key(),
        "--ota-confirm-secs",
        "2",
        "--ota-deadline-secs",
        "6",
        "--heartbeat-secs",
        "1",
        "--telemetry-secs",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn start_fleet(server: &Server, jwt: &str, kit: &Kit, ids: &[&str]) -> Vec<Agent> {
    let args = agent_args(kit);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agents = Vec::new();
    for id in ids {
        let agent = Agent::start(server, &server.dir.path().join(id), &args)
            .await
            .unwrap();
        agent.provision(server, jwt, id).await.unwrap();
        agents.push(agent);
    }
    for id in ids {
        wait_for_version(server, jwt, id, "1.0.0").await;
    }
    agents
}

async fn wait_for_version(server: &Server, jwt: &str, id: &str, version: &str) -> Value {
    wait_for(
        &format!("{id} online on {version}"),
        Duration::from_secs(60),
        || async {
            let d = server.device(jwt, id).await.ok()?;
            (d["online"] == true && d["firmwareVersion"] == version).then_some(d)
        },
    )
    .await
    .unwrap()
}

async fn wait_rollout(server: &Server, jwt: &str, id: &str, state: &str) -> Value {
    wait_for(
        &format!("rollout {id} {state}"),
        Duration::from_secs(120),
        || async {
            let (_, r) = server
                .call("GET", &format!("/api/rollouts/{id}"), Some(jwt), None)
                .await
                .ok()?;
            (r["progress"]["state"] == state).then_some(r)
        },
    )
    .await
    .unwrap()
}

async fn history(server: &Server, jwt: &str, id: &str) -> Vec<Value> {
    let (s, h) = server
        .call("GET", &format!("/api/ota/{id}/history"), Some(jwt), None)
        .await
        .unwrap();
    assert_eq!(s, 200, "{h}");
    h["updates"].as_array().cloned().unwrap_or_default()
}

fn statuses(update: &Value) -> Vec<String> {
    update["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["status"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_release_rolls_out_and_a_crashing_one_rolls_back_and_stops_the_rollout()
-> anyhow::Result<()> {
    let (tmp, kit, server, jwt, cli) = rig(&[], &[]).await?;
    let ids = ["ota-a", "ota-b", "ota-c"];
    let _agents = start_fleet(&server, &jwt, &kit, &ids).await;

    // A release signed by a key the server does not trust is refused, and nothing is stored.
    let rogue = Kit::new(&tmp.path().join("rogue").tap_mkdir());
    let forged = rogue.release("1.1.0", "normal");
    let out = cli.run(&["release", "publish", forged.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("release refused"));
    assert_eq!(cli.json(&["release", "list"]), json!([]));

    // The real release, with an image that does not match its manifest first.
    let good = kit.release("1.1.0", "normal");
    let wrong = kit.dir.join("wrong.bin");
    let mut bytes = std::fs::read(&good)?;
    bytes[1000] ^= 1;
    std::fs::write(&wrong, &bytes)?;
    let manifest = format!("{}.manifest.json", good.display());
    let out = cli.run(&[
        "release",
        "publish",
        wrong.to_str().unwrap(),
        "--manifest",
        &manifest,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHA-256"));
    assert_eq!(cli.json(&["release", "list"])[0]["ready"], false);
    // Uploading the right image completes the release (the manifest is already stored).
    let (s, _) = put_image(&server, &jwt, "1.1.0", std::fs::read(&good)?).await;
    assert_eq!(s, 200);
    assert_eq!(cli.json(&["release", "list"])[0]["ready"], true);

    let (_, check) = server
        .call("GET", "/api/ota/ota-a/check", Some(&jwt), None)
        .await?;
    assert_eq!(check["updateAvailable"], true, "{check}");
    assert_eq!(check["latestVersion"], "1.1.0");

    // Staged: one device first, then the rest.
    let rollout = cli.json(&[
        "rollout",
        "create",
        "1.1.0",
        "--hardware",
        "esp32c3",
        "--phases",
        "1,100",
        "--device-timeout",
        "90",
    ]);
    let rollout_id = rollout["id"].as_str().unwrap().to_string();
    assert_eq!(rollout["targetCount"], 3);
    let done = wait_rollout(&server, &jwt, &rollout_id, "completed").await;
    assert_eq!(done["progress"]["succeeded"], 3, "{done}");
    for id in ids {
        wait_for_version(&server, &jwt, id, "1.1.0").await;
        let h = history(&server, &jwt, id).await;
        assert_eq!(h[0]["state"], "succeeded", "{id}: {h:?}");
        let st = statuses(&h[0]);
        assert_eq!(st.first().map(String::as_str), Some("STARTED"), "{st:?}");
        assert!(st.iter().any(|s| s == "IN_PROGRESS"), "{st:?}");
        assert_eq!(st.last().map(String::as_str), Some("SUCCESS"), "{st:?}");
    }
    let dist = cli.json(&["ota", "distribution"]);
    assert_eq!(
        dist["versions"],
        json!([{ "version": "1.1.0", "devices": 3 }])
    );

    // A release that crashes at boot: phase 1 is two of three devices.
    let bad = kit.release("1.2.0", "crash-at-boot");
    cli.json(&["release", "publish", bad.to_str().unwrap()]);
    let rollout = cli.json(&[
        "rollout",
        "create",
        "1.2.0",
        "--all",
        "--phases",
        "50,100",
        "--device-timeout",
        "90",
    ]);
    let bad_id = rollout["id"].as_str().unwrap().to_string();
    let stopped = wait_rollout(&server, &jwt, &bad_id, "stopped").await;
    assert_eq!(stopped["progress"]["phase"], 0, "{stopped}");
    // Every device it reached rolled back by itself and runs the previous image again.
    let reached: Vec<String> = wait_for(
        "reached devices report",
        Duration::from_secs(90),
        || async {
            let mut reached = Vec::new();
            for id in ids {
                let h = history(&server, &jwt, id).await;
                match h.first() {
                    Some(u) if u["version"] == "1.2.0" && u["state"] == "rolled_back" => {
                        reached.push(id.to_string())
                    }
                    Some(u) if u["version"] == "1.2.0" => return None,
                    _ => {}
                }
            }
            Some(reached)
        },
    )
    .await?;
    assert_eq!(reached.len(), 2, "{reached:?}");
    for id in ids {
        wait_for_version(&server, &jwt, id, "1.1.0").await;
    }
    let untouched: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !reached.iter().any(|r| r == id))
        .collect();
    assert_eq!(untouched.len(), 1);
    assert_eq!(
        history(&server, &jwt, untouched[0]).await[0]["version"],
        "1.1.0"
    );
    let rolled = &history(&server, &jwt, &reached[0]).await[0];
    assert!(statuses(rolled).contains(&"ROLLED_BACK".to_string()));
    assert!(
        rolled["error"].as_str().unwrap().contains("3 boots"),
        "{rolled}"
    );

    // Every transition is audited; the stop says why.
    let (_, audit) = server
        .call(
            "GET",
            "/api/admin/audit?action=rollout.transition&limit=50",
            Some(&jwt),
            None,
        )
        .await?;
    let details: Vec<String> = audit
        .as_array()
        .or(audit["entries"].as_array())
        .into_iter()
        .flatten()
        .map(|e| format!("{} {}", e["result"], e["detail"]))
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d.contains("stopped itself in phase 1")),
        "{details:?}"
    );
    assert!(
        details.iter().any(|d| d.contains("completed")),
        "{details:?}"
    );

    // Blocking the bad release: listed like seed 003's blocked_versions.json, never offered.
    cli.json(&["release", "block", "1.2.0", "--reason", "crashes at boot"]);
    let (_, blocked) = server
        .call("GET", "/api/releases/blocked", Some(&jwt), None)
        .await?;
    assert_eq!(blocked["blockedVersions"], json!(["1.2.0"]));
    let out = cli.run(&["ota", "send", untouched[0], "1.2.0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("blocked"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_over_a_dropping_link_resumes_and_an_unreachable_release_rolls_back()
-> anyhow::Result<()> {
    let (tmp, kit, server, jwt, cli) = rig(&[], &[]).await?;

    // The device reaches the server's HTTPS listener through a link that drops every
    // connection after 150-450 KB; the 1.5 MiB image needs several resumed requests.
    let target = format!("127.0.0.1:{}", server.device_port).parse()?;
    let proxy = CuttingProxy::start(target, |n| 150_000 + (n * 97_003) % 300_000).await?;
    let args = agent_args(&kit);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    let backend = format!("https://localhost:{}", proxy.addr.port());
    args.extend(["--backend-url", &backend]);
    let agent = Agent::start(&server, &tmp.path().join("ota-link"), &args).await?;
    agent.provision(&server, &jwt, "ota-link").await?;
    wait_for_version(&server, &jwt, "ota-link", "1.0.0").await;

    let good = kit.release("1.1.0", "normal");
    cli.json(&["release", "publish", good.to_str().unwrap()]);
    let update = cli.json(&["ota", "send", "ota-link", "1.1.0"]);
    assert_eq!(update["state"], "offered");
    wait_for_version(&server, &jwt, "ota-link", "1.1.0").await;
    let h = wait_for("update succeeded", Duration::from_secs(30), || async {
        let h = history(&server, &jwt, "ota-link").await;
        (h[0]["state"] == "succeeded").then_some(h)
    })
    .await?;
    let cuts = proxy.cuts.load(std::sync::atomic::Ordering::SeqCst);
    assert!(cuts >= 3, "the link was cut only {cuts} times");
    assert!(agent.log().contains("download interrupted"));
    assert_eq!(statuses(&h[0]).last().map(String::as_str), Some("SUCCESS"));

    // A release that boots but never reaches the broker: not confirmed, restarted at its
    // deadline, rolled back after three boots, and the old image reports ROLLED_BACK.
    let lost = kit.release("1.2.0", "never-connects");
    cli.json(&["release", "publish", lost.to_str().unwrap()]);
    cli.json(&["ota", "send", "ota-link", "1.2.0"]);
    let h = wait_for("rolled back", Duration::from_secs(120), || async {
        let h = history(&server, &jwt, "ota-link").await;
        (h[0]["state"] == "rolled_back").then_some(h)
    })
    .await?;
    assert_eq!(h[0]["version"], "1.2.0");
    wait_for_version(&server, &jwt, "ota-link", "1.1.0").await;

    // The device listener serves images only to devices holding an open offer.
    let (cert, key, _) = server
        .enroll(&jwt, "ota-other")
        .await?
        .write_files(tmp.path())?;
    let identity = reqwest::Identity::from_pem(
        format!(
            "{}\n{}",
            std::fs::read_to_string(cert)?,
            std::fs::read_to_string(key)?
        )
        .as_bytes(),
    )?;
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem().as_bytes())?)
        .identity(identity)
        .build()?;
    let url = format!("{}/firmware/1.1.0", server.backend_url());
    assert_eq!(client.get(&url).send().await?.status(), 403);
    let anonymous = server.device_http()?.get(&url).send().await?;
    assert_eq!(anonymous.status(), 401);
    Ok(())
}

async fn put_image(server: &Server, jwt: &str, version: &str, bytes: Vec<u8>) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .put(format!("{}/api/releases/{version}/image", server.http))
        .bearer_auth(jwt)
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

trait MkDir {
    fn tap_mkdir(self) -> Self;
}

impl MkDir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_in_an_s3_bucket_are_presigned_and_served_to_devices() -> anyhow::Result<()> {
    let moto = flotilla_e2e::Moto::start("flotilla-firmware").await?;
    let (tmp, kit, server, jwt, cli) = rig(
        &[
            "--s3-bucket",
            "flotilla-firmware",
            "--s3-endpoint",
            &moto.endpoint,
        ],
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
        ],
    )
    .await?;
    let image = kit.release("1.1.0", "normal");
    cli.json(&["release", "publish", image.to_str().unwrap()]);

    // Stored in the bucket as seed 003 lays it out, and reachable by a presigned URL alone.
    let (s, presigned) = server
        .call("GET", "/api/releases/1.1.0/download", Some(&jwt), None)
        .await?;
    assert_eq!(s, 200, "{presigned}");
    let url = presigned["url"].as_str().unwrap();
    assert!(
        url.contains("esp32c3/releases/v1.1.0/firmware.bin"),
        "{url}"
    );
    assert!(url.contains("X-Amz-Signature"), "{url}");
    let fetched = reqwest::get(url).await?.bytes().await?;
    assert_eq!(&fetched[..], &std::fs::read(&image)?[..]);
    // Without the signature the bucket does not serve it.
    let unsigned = url.split('?').next().unwrap();
    let status = reqwest::get(unsigned).await?.status();
    assert!(status.is_client_error(), "unsigned GET answered {status}");

    // A device updates from it through the device listener, with Range.
    let args = agent_args(&kit);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&server, &tmp.path().join("ota-s3"), &args).await?;
    agent.provision(&server, &jwt, "ota-s3").await?;
    wait_for_version(&server, &jwt, "ota-s3", "1.0.0").await;
    cli.json(&["ota", "send", "ota-s3", "1.1.0"]);
    wait_for_version(&server, &jwt, "ota-s3", "1.1.0").await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_target_tags_take_exponential_phases_and_refuse_bad_settings() -> anyhow::Result<()>
{
    let (_tmp, kit, server, jwt, cli) = rig(&[], &[]).await?;
    for id in ["tag-a", "tag-b", "tag-c"] {
        cli.json(&["device", "register", id]);
    }
    let tagged = cli.json(&["device", "tag", "tag-b", "site:north,canary"]);
    assert_eq!(tagged["tags"], json!(["canary", "site:north"]));
    let (s, _) = server
        .call(
            "POST",
            "/api/device/tag-a/tags",
            Some(&jwt),
            Some(json!({"tags": ["x"]})),
        )
        .await?;
    assert_eq!(s, 405, "tags are replaced with PUT");
    let image = kit.release("1.1.0", "normal");
    cli.json(&["release", "publish", image.to_str().unwrap()]);

    let r = cli.json(&[
        "rollout",
        "create",
        "1.1.0",
        "--tag",
        "canary",
        "--exponential",
        "1,2",
        "--window",
        "23:00-01:00",
    ]);
    assert_eq!(r["targetCount"], 1, "{r}");
    assert_eq!(
        r["config"]["phases"],
        json!([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 100.0])
    );
    assert_eq!(
        r["config"]["maintenanceWindow"],
        json!({"start": "23:00", "end": "01:00"})
    );
    let r = cli.json(&["rollout", "create", "1.1.0", "--all"]);
    assert_eq!(r["targetCount"], 3);
    let rollout_id = r["id"].as_str().unwrap().to_string();
    let paused = cli.json(&["rollout", "pause", &rollout_id]);
    assert_eq!(paused["progress"]["state"], "paused", "{paused}");

    for (body, hint) in [
        (
            json!({"version": "1.1.0", "target": {"all": true, "tag": "x"}}),
            "exactly one",
        ),
        (
            json!({"version": "1.1.0", "target": {"all": true}, "phases": [50, 10, 100]}),
            "phases",
        ),
        (
            json!({"version": "1.1.0", "target": {"all": true}, "maintenanceWindow": {"start": "25:00", "end": "01:00"}}),
            "maintenanceWindow",
        ),
        (
            json!({"version": "1.1.0", "target": {"devices": ["nope"]}}),
            "no such device",
        ),
        (
            json!({"version": "1.1.0", "target": {"all": true}, "speed": "ludicrous"}),
            "unknown field",
        ),
    ] {
        let (s, b) = server
            .call("POST", "/api/rollouts", Some(&jwt), Some(body))
            .await?;
        assert_eq!(s, 400, "{b}");
        assert!(b["error"].as_str().unwrap().contains(hint), "{b}");
    }
    let (s, _) = server
        .call(
            "POST",
            "/api/rollouts",
            Some(&jwt),
            Some(json!({"version": "9.9.9", "target": {"all": true}})),
        )
        .await?;
    assert_eq!(s, 404);

    // Blocking its release aborts it; an ended rollout takes no more controls.
    cli.json(&["release", "block", "1.1.0", "--reason", "bad batch"]);
    let aborted = wait_rollout(&server, &jwt, &rollout_id, "aborted").await;
    assert_eq!(aborted["state"], "aborted");
    let out = cli.run(&["rollout", "resume", &rollout_id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rollout is aborted"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_a_server_restart_and_catches_up_a_device_that_was_offline()
-> anyhow::Result<()> {
    let (tmp, kit, mut server, jwt, cli) = rig(&[], &[]).await?;
    // rs-a runs; rs-b is registered but its agent is not started yet.
    let _a = start_fleet(&server, &jwt, &kit, &["rs-a"]).await;
    cli.json(&["device", "register", "rs-b"]);
    let image = kit.release("1.1.0", "normal");
    cli.json(&["release", "publish", image.to_str().unwrap()]);
    let r = cli.json(&["rollout", "create", "1.1.0", "--all", "--phases", "50,100"]);
    let id = r["id"].as_str().unwrap().to_string();
    assert_eq!(r["targetCount"], 2);
    // Phase 1 (rs-a) succeeds; phase 2 waits for rs-b, which is away.
    wait_for_version(&server, &jwt, "rs-a", "1.1.0").await;
    wait_for("phase 2", Duration::from_secs(30), || async {
        let (_, r) = server
            .call("GET", &format!("/api/rollouts/{id}"), Some(&jwt), None)
            .await
            .ok()?;
        (r["progress"]["phase"] == 1).then_some(())
    })
    .await?;

    let before = wait_rollout(&server, &jwt, &id, "running").await;
    let transitions_before = transitions(&server, &jwt, &id).await;
    assert_eq!(
        transitions_before.len(),
        2,
        "running phase 1, then phase 2: {transitions_before:?}"
    );

    server.restart().await?;
    let jwt = server.login("admin@example.com", "admin-pass").await?;
    // Give the restarted server time to restore the planner and act on it (it reads the
    // database every second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = wait_rollout(&server, &jwt, &id, "running").await;
    assert_eq!(
        after["progress"]["phase"], 1,
        "restored in the phase it was in: {after}"
    );
    assert_eq!(after["progress"], before["progress"], "same counts");
    assert_eq!(
        after["waitUntil"], before["waitUntil"],
        "timers kept: {after}"
    );
    assert_eq!(
        transitions(&server, &jwt, &id).await,
        transitions_before,
        "no transition written again by the restore"
    );

    // rs-b arrives (provisioned against the restarted server) and is caught up.
    let args = agent_args(&kit);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let b = Agent::start(&server, &tmp.path().join("rs-b"), &args).await?;
    b.provision(&server, &jwt, "rs-b").await?;
    wait_for_version(&server, &jwt, "rs-b", "1.1.0").await;
    let done = wait_rollout(&server, &jwt, &id, "completed").await;
    assert_eq!(done["progress"]["succeeded"], 2, "{done}");
    // The restart did not make the server offer rs-a the release a second time.
    assert_eq!(history(&server, &jwt, "rs-a").await.len(), 1);
    Ok(())
}

async fn transitions(server: &Server, jwt: &str, rollout: &str) -> Vec<(String, String)> {
    server.rollout_transitions(jwt, rollout).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_skips_a_device_that_stays_offline_finishes_and_updates_it_when_it_returns()
-> anyhow::Result<()> {
    let (tmp, kit, server, jwt, cli) = rig(&[], &[]).await?;
    let _a = start_fleet(&server, &jwt, &kit, &["sk-a"]).await;
    cli.json(&["device", "register", "sk-b"]);
    let image = kit.release("1.1.0", "normal");
    cli.json(&["release", "publish", image.to_str().unwrap()]);
    let r = cli.json(&[
        "rollout",
        "create",
        "1.1.0",
        "--all",
        "--phases",
        "100",
        "--wait-timeout",
        "3",
    ]);
    let id = r["id"].as_str().unwrap().to_string();
    assert_eq!(r["targetCount"], 2);
    // sk-b never shows up within 3 s: it is skipped and the rollout ends without it.
    let done = wait_rollout(&server, &jwt, &id, "completed").await;
    assert_eq!(done["progress"]["succeeded"], 1, "{done}");
    assert_eq!(done["progress"]["skipped"], 1, "{done}");
    assert_eq!(done["progress"]["failed"], 0, "{done}");
    let (_, audited) = transitions(&server, &jwt, &id).await.pop().unwrap();
    assert!(audited.contains("1 skipped"), "{audited}");
    // It comes online later and is offered the release it missed.
    let args = agent_args(&kit);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let b = Agent::start(&server, &tmp.path().join("sk-b"), &args).await?;
    b.provision(&server, &jwt, "sk-b").await?;
    wait_for_version(&server, &jwt, "sk-b", "1.1.0").await;
    let h = wait_for(
        "sk-b's late update succeeded",
        Duration::from_secs(30),
        || async {
            let h = history(&server, &jwt, "sk-b").await;
            (h.first().is_some_and(|u| u["state"] == "succeeded")).then_some(h)
        },
    )
    .await?;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0]["rolloutId"], id.as_str());
    // The rollout's progress counts the late success (the leader's next tick records it).
    let counted = |r: &Value| r["progress"]["succeeded"] == json!(2);
    let after = wait_for(
        "the rollout counts sk-b's late success",
        Duration::from_secs(30),
        || async {
            let r = server.rollout(&jwt, &id).await?;
            counted(&r).then_some(r)
        },
    )
    .await
    .unwrap_or_default();
    assert_eq!(
        (
            &after["progress"]["succeeded"],
            &after["progress"]["skipped"]
        ),
        (&json!(2), &json!(0)),
        "{after}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_answers_an_offer_times_out_as_a_failure() -> anyhow::Result<()> {
    let (_tmp, kit, server, jwt, cli) = rig(&[], &[]).await?;
    // A device that is online (it says so) but ignores the offer it is sent.
    let id = server.enroll(&jwt, "mute-dev").await?;
    let mut dev = flotilla_e2e::mqtt::connect_device(server.mqtt_port, &id).await?;
    dev.subscribe("devices/mute-dev/ota").await?;
    dev.publish(
        "devices/mute-dev/status",
        br#"{"online":true,"fw":"1.0.0","hw":"esp32c3"}"#.to_vec(),
    )
    .await?;
    wait_for_version(&server, &jwt, "mute-dev", "1.0.0").await;
    let image = kit.release("1.1.0", "normal");
    cli.json(&["release", "publish", image.to_str().unwrap()]);
    let r = cli.json(&[
        "rollout",
        "create",
        "1.1.0",
        "--hardware",
        "esp32c3",
        "--device-timeout",
        "2",
    ]);
    let rollout = r["id"].as_str().unwrap().to_string();
    // The offer arrives, signed, naming the release's image on the device listener.
    let (topic, payload) = dev.message(Duration::from_secs(10)).await?;
    assert_eq!(topic, "devices/mute-dev/ota");
    let offer: Value = serde_json::from_slice(&payload)?;
    assert_eq!(offer["url"], "/firmware/1.1.0");
    assert_eq!(offer["manifest"]["signature"].as_str().unwrap().len(), 128);
    let stopped = wait_rollout(&server, &jwt, &rollout, "stopped").await;
    assert_eq!(stopped["progress"]["timedOut"], 1, "{stopped}");
    assert_eq!(
        stopped["progress"]["halt"], "too_many_failures",
        "{stopped}"
    );
    let h = history(&server, &jwt, "mute-dev").await;
    assert_eq!(h[0]["state"], "failed");
    assert_eq!(h[0]["error"], "timed out");
    // An operator overrides the stop: the timeout is forgiven, and with nothing left to offer
    // the rollout completes. The override is audited under the operator's name.
    let resumed = cli.json(&["rollout", "resume", &rollout]);
    assert_eq!(resumed["state"], "completed", "{resumed}");
    assert_eq!(resumed["forgivenFailed"], 1, "{resumed}");
    let (_, audit) = server
        .call(
            "GET",
            "/api/admin/audit?action=rollout.resume",
            Some(&jwt),
            None,
        )
        .await?;
    let entry = &audit[0];
    assert_eq!(
        (entry["result"].as_str(), entry["target"].as_str()),
        (Some("success"), Some(rollout.as_str())),
        "{audit}"
    );
    assert!(
        entry["actor"].as_str().unwrap().starts_with("user:"),
        "{audit}"
    );
    Ok(())
}

/// A device played by hand, on 1.0.0, that took a rollout's offer of 1.1.0 (1.2.0 is
/// published too) and reports it downloading: its identity, session, rollout and offer id.
async fn downloading_a_rollouts_release(
    server: &Server,
    jwt: &str,
    cli: &Cli,
    kit: &Kit,
    device: &str,
) -> anyhow::Result<(
    flotilla_e2e::DeviceIdentity,
    flotilla_e2e::mqtt::Session,
    String,
    String,
)> {
    let id = server.enroll(jwt, device).await?;
    let mut dev = flotilla_e2e::mqtt::connect_device(server.mqtt_port, &id).await?;
    dev.subscribe(&format!("devices/{device}/ota")).await?;
    dev.publish(
        &format!("devices/{device}/status"),
        br#"{"online":true,"fw":"1.0.0","hw":"esp32c3"}"#.to_vec(),
    )
    .await?;
    wait_for_version(server, jwt, device, "1.0.0").await;
    for v in ["1.1.0", "1.2.0"] {
        let image = kit.release(v, "normal");
        cli.json(&["release", "publish", image.to_str().unwrap()]);
    }
    let r = cli.json(&["rollout", "create", "1.1.0", "--devices", device]);
    let rollout = r["id"].as_str().unwrap().to_string();
    let (_, payload) = dev.message(Duration::from_secs(10)).await?;
    let offer: Value = serde_json::from_slice(&payload)?;
    let offer_id = offer["id"].as_str().unwrap().to_string();
    let report = json!({"status": "IN_PROGRESS", "id": offer_id, "progress": 40});
    dev.publish(
        &format!("devices/{device}/ota/status"),
        report.to_string().into_bytes(),
    )
    .await?;
    wait_for(
        "the download is recorded",
        Duration::from_secs(10),
        || async {
            let h = history(server, jwt, device).await;
            (h.first()?["state"] == "in_progress").then_some(())
        },
    )
    .await?;
    Ok((id, dev, rollout, offer_id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_offer_while_the_device_downloads_a_rollouts_release_is_refused_with_409()
-> anyhow::Result<()> {
    let (_tmp, kit, server, jwt, cli) = rig(&[], &[]).await?;
    let (_, mut dev, rollout, offer_id) =
        downloading_a_rollouts_release(&server, &jwt, &cli, &kit, "busy-dev").await?;
    let (status, body) = server
        .call(
            "POST",
            "/api/ota/busy-dev/start",
            Some(&jwt),
            Some(json!({"version": "1.2.0"})),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.to_string().contains(&offer_id),
        "names the update in the way: {body}"
    );
    // Nothing changed: the rollout's update is still the device's only one, and it ends as
    // the device reports.
    let h = history(&server, &jwt, "busy-dev").await;
    assert_eq!(h.len(), 1);
    // All downloaded: past recall, so a cancel is refused and the outcome still counts.
    let report = json!({"status": "IN_PROGRESS", "id": offer_id, "progress": 100});
    dev.publish(
        "devices/busy-dev/ota/status",
        report.to_string().into_bytes(),
    )
    .await?;
    wait_for("the download complete", Duration::from_secs(10), || async {
        let h = history(&server, &jwt, "busy-dev").await;
        (h.first()?["progress"] == 100).then_some(())
    })
    .await?;
    let (status, body) = server
        .call("POST", "/api/ota/busy-dev/cancel", Some(&jwt), None)
        .await?;
    assert_eq!(status, 409, "{body}");
    let done = json!({"status": "SUCCESS", "id": offer_id, "version": "1.1.0"});
    dev.publish("devices/busy-dev/ota/status", done.to_string().into_bytes())
        .await?;
    dev.publish(
        "devices/busy-dev/status",
        br#"{"online":true,"fw":"1.1.0","hw":"esp32c3"}"#.to_vec(),
    )
    .await?;
    let completed = wait_rollout(&server, &jwt, &rollout, "completed").await;
    assert_eq!(completed["progress"]["succeeded"], 1, "{completed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_made_before_the_device_subscribed_reaches_it_when_it_subscribes()
-> anyhow::Result<()> {
    if flotilla_e2e::external_broker::embedded_only(
        "the offer follows the broker's subscribe event, which an external broker does not report",
    ) {
        return Ok(());
    }
    let (_tmp, kit, server, jwt, cli) = rig(&[], &[]).await?;
    let id = server.enroll(&jwt, "late-ota").await?;
    // Online (its status arrived) but not yet subscribed to its OTA topic: the offer made now
    // has nowhere to go at the broker.
    let mut dev = flotilla_e2e::mqtt::connect_device(server.mqtt_port, &id).await?;
    dev.publish(
        "devices/late-ota/status",
        br#"{"online":true,"fw":"1.0.0","hw":"esp32c3"}"#.to_vec(),
    )
    .await?;
    wait_for_version(&server, &jwt, "late-ota", "1.0.0").await;
    let image = kit.release("1.1.0", "normal");
    cli.json(&["release", "publish", image.to_str().unwrap()]);
    let (status, update) = server
        .call(
            "POST",
            "/api/ota/late-ota/start",
            Some(&jwt),
            Some(serde_json::json!({"version": "1.1.0"})),
        )
        .await?;
    assert_eq!(status, 202, "{update}");
    // The session starts its OTA channel now: the open offer is sent, no second online edge
    // needed; a second SUBSCRIBE in the same session does not send it again.
    dev.subscribe("devices/late-ota/ota").await?;
    let (topic, payload) = dev.message(Duration::from_secs(10)).await?;
    assert_eq!(topic, "devices/late-ota/ota");
    let offer: Value = serde_json::from_slice(&payload)?;
    assert_eq!(offer["id"], update["id"], "{offer}");
    assert_eq!(offer["url"], "/firmware/1.1.0");
    dev.subscribe("devices/late-ota/ota").await?;
    assert!(dev.message(Duration::from_millis(800)).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_gated_rollout_stops_when_its_updated_device_crashes_more_than_the_rest()
-> anyhow::Result<()> {
    let (_tmp, kit, server, jwt, cli) = rig(&[], &[]).await?;
    let ids = ["hg-0", "hg-1", "hg-2", "hg-3"];
    let mut devices = Vec::new();
    for id in ids {
        let identity = server.enroll(&jwt, id).await?;
        let mut dev = flotilla_e2e::mqtt::connect_device(server.mqtt_port, &identity).await?;
        dev.subscribe(&format!("devices/{id}/ota")).await?;
        dev.publish(
            &format!("devices/{id}/status"),
            br#"{"online":true,"fw":"1.0.0","hw":"esp32c3"}"#.to_vec(),
        )
        .await?;
        wait_for_version(&server, &jwt, id, "1.0.0").await;
        devices.push(dev);
    }
    let image = kit.release("1.1.0", "normal");
    cli.json(&["release", "publish", image.to_str().unwrap()]);
    let body = json!({
        "version": "1.1.0",
        "target": { "devices": ids },
        "phases": [25, 100],
        // A device is heard at most every 5 s: three crashes take 15 s, judged at 25 s.
        "health": { "maxCrashRatio": 2, "minObservedSecs": 25, "minEvents": 3 },
    });
    let (status, created) = server
        .call("POST", "/api/rollouts", Some(&jwt), Some(body))
        .await?;
    assert_eq!(status, 201, "{created}");
    let rollout = created["id"].as_str().unwrap().to_string();

    // The first phase offers the release to one device, which installs it.
    let (topic, payload) = devices[0].message(Duration::from_secs(10)).await?;
    assert_eq!(topic, "devices/hg-0/ota");
    let offer: Value = serde_json::from_slice(&payload)?;
    let done = json!({"status": "SUCCESS", "id": offer["id"], "version": "1.1.0"});
    devices[0]
        .publish("devices/hg-0/ota/status", done.to_string().into_bytes())
        .await?;
    devices[0]
        .publish(
            "devices/hg-0/status",
            br#"{"online":true,"fw":"1.1.0","hw":"esp32c3"}"#.to_vec(),
        )
        .await?;
    wait_for_version(&server, &jwt, "hg-0", "1.1.0").await;

    // Heartbeats: the updated device crashes at every beat, the others never.
    let stopped = server
        .crash_one_until_rollout_halts(
            &jwt,
            &rollout,
            &mut devices,
            &ids,
            0,
            Duration::from_secs(90),
        )
        .await?;
    assert_eq!(stopped["progress"]["state"], "stopped", "{stopped}");
    assert_eq!(
        stopped["progress"]["halt"], "unhealthy_crashes",
        "{stopped}"
    );
    assert_eq!(stopped["progress"]["phase"], 0, "{stopped}");
    let reason = stopped["progress"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("devices on 1.1.0 crash"), "{reason}");
    // The other three were never offered it.
    assert_eq!(stopped["progress"]["succeeded"], 1, "{stopped}");
    assert_eq!(stopped["progress"]["waiting"], 3, "{stopped}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_update_stops_the_download_on_the_device_which_then_takes_the_next_offer()
-> anyhow::Result<()> {
    let (tmp, kit, server, jwt, cli) = rig(&[], &[]).await?;
    // Until `stall` is cleared, a connection to the device listener stalls after 400 KB (the
    // image is 1.5 MiB; certificate signing needs far less).
    let target = format!("127.0.0.1:{}", server.device_port).parse()?;
    let stall = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let stalling = stall.clone();
    let proxy = CuttingProxy::stalling(target, move |_| {
        if stalling.load(std::sync::atomic::Ordering::SeqCst) {
            400_000
        } else {
            usize::MAX
        }
    })
    .await?;
    let args = agent_args(&kit);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    let backend = format!("https://localhost:{}", proxy.addr.port());
    args.extend(["--backend-url", &backend]);
    let agent = Agent::start(&server, &tmp.path().join("ota-cancel"), &args).await?;
    agent.provision(&server, &jwt, "ota-cancel").await?;
    wait_for_version(&server, &jwt, "ota-cancel", "1.0.0").await;
    for v in ["1.1.0", "1.2.0"] {
        let image = kit.release(v, "normal");
        cli.json(&["release", "publish", image.to_str().unwrap()]);
    }
    cli.json(&["ota", "send", "ota-cancel", "1.1.0"]);
    wait_for(
        "the download under way",
        Duration::from_secs(30),
        || async {
            let h = history(&server, &jwt, "ota-cancel").await;
            (h.first()?["state"] == "in_progress").then_some(())
        },
    )
    .await?;
    // While it downloads, a new offer is refused ...
    let (status, body) = server
        .call(
            "POST",
            "/api/ota/ota-cancel/start",
            Some(&jwt),
            Some(json!({"version": "1.2.0"})),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    // ... until the operator cancels it: the device stops and says so.
    let cancelled = cli.json(&["ota", "cancel", "ota-cancel"]);
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    let h = wait_for(
        "the device's FAILED report",
        Duration::from_secs(30),
        || async {
            let h = history(&server, &jwt, "ota-cancel").await;
            statuses(h.first()?)
                .contains(&"FAILED".to_string())
                .then_some(h)
        },
    )
    .await
    .inspect_err(|_| eprintln!("{}", agent.log()))?;
    assert_eq!(h[0]["state"], "cancelled");
    let failed = h[0]["events"].as_array().unwrap().last().unwrap().clone();
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("cancelled by the server"),
        "{failed}"
    );
    let (status, body) = server
        .call("POST", "/api/ota/ota-cancel/cancel", Some(&jwt), None)
        .await?;
    assert_eq!(status, 404, "nothing left to cancel: {body}");
    let (_, audited) = server
        .call(
            "GET",
            "/api/admin/audit?action=ota.cancel",
            Some(&jwt),
            None,
        )
        .await?;
    assert_eq!(audited.as_array().unwrap().len(), 1, "{audited}");

    // The device is free: the next offer downloads (the link passes now) and installs.
    stall.store(false, std::sync::atomic::Ordering::SeqCst);
    cli.json(&["ota", "send", "ota-cancel", "1.2.0"]);
    wait_for_version(&server, &jwt, "ota-cancel", "1.2.0").await;
    assert!(proxy.cuts.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    drop(agent);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_rollouts_update_frees_its_target_without_a_failure_and_reaches_a_device_that_was_away()
-> anyhow::Result<()> {
    let (_tmp, kit, server, jwt, cli) = rig(&[], &[]).await?;
    let (id, mut dev, rollout, offer_id) =
        downloading_a_rollouts_release(&server, &jwt, &cli, &kit, "away-dev").await?;

    cli.json(&["ota", "cancel", "away-dev"]);
    let (_, payload) = dev.message(Duration::from_secs(10)).await?;
    let cancel: Value = serde_json::from_slice(&payload)?;
    assert_eq!(cancel, json!({ "cancel": offer_id }));
    // The rollout hears it: the target is not failed; it waits, or (seen online again) is
    // offered anew.
    let r = wait_for("the target freed", Duration::from_secs(15), || async {
        let (_, r) = server
            .call("GET", &format!("/api/rollouts/{rollout}"), Some(&jwt), None)
            .await
            .ok()?;
        let h = history(&server, &jwt, "away-dev").await;
        let freed = r["progress"]["inFlight"] == 0 || h.first()?["id"] != offer_id.as_str();
        freed.then_some(r)
    })
    .await?;
    assert_eq!(r["progress"]["failed"], 0, "{r}");
    assert_eq!(r["progress"]["state"], "running", "{r}");

    // A device that was away when the cancel went out gets it at its next session.
    if flotilla_e2e::external_broker::embedded_only(
        "the cancel follows the broker's session-start event, which an external broker does not report",
    ) {
        return Ok(());
    }
    drop(dev);
    let mut dev = flotilla_e2e::mqtt::connect_device(server.mqtt_port, &id).await?;
    dev.subscribe("devices/away-dev/ota").await?;
    // The rollout may offer again too: look for the cancel among what arrives.
    let mut arrived = Vec::new();
    while let Ok((_, payload)) = dev.message(Duration::from_secs(5)).await {
        let v: Value = serde_json::from_slice(&payload)?;
        if v.get("cancel").is_some() {
            arrived.push(v);
            break;
        }
    }
    assert_eq!(arrived, [json!({ "cancel": offer_id })]);
    Ok(())
}

/// A validly signed release whose image is not the app image its manifest names (a file of
/// another kind, a build for another board) is refused at upload, and stays unready: every
/// device would otherwise download it whole, and then refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_release_whose_image_is_not_the_app_image_it_names_is_refused_at_upload()
-> anyhow::Result<()> {
    let (tmp, kit, server, jwt, cli) = rig(&[], &[]).await?;
    let other_board = tmp.path().join("other-board.bin");
    let built = std::process::Command::new(flotilla_e2e::bin("flotilla-agent"))
        .args([
            "image",
            "--version",
            "1.2.0",
            "--hardware",
            "devkit-c3",
            "--out",
        ])
        .arg(&other_board)
        .output()?;
    assert!(built.status.success(), "{built:?}");
    for (version, bytes, why) in [
        (
            "1.2.0",
            std::fs::read(&other_board)?,
            "app descriptor disagrees with the manifest",
        ),
        ("1.3.0", vec![0xA5u8; 4096], "not an app image"),
    ] {
        let signed = kit.sign_anything(&bytes, version, "esp32c3");
        let (s, body) = server
            .call("POST", "/api/releases", Some(&jwt), Some(signed))
            .await?;
        assert_eq!(s, 201, "{body}");
        let (s, body) = put_image(&server, &jwt, version, bytes).await;
        assert_eq!(s, 400, "{body}");
        assert!(body.to_string().contains(why), "{body}");
    }
    let releases = cli.json(&["release", "list"]);
    let ready: Vec<_> = releases
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ready"].clone())
        .collect();
    assert_eq!(ready, [json!(false), json!(false)], "{releases}");
    Ok(())
}
