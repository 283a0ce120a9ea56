//! `flotilla-agent sim`: several virtual devices in one process, provisioned in bulk.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Stdio;
use std::time::Duration;

use flotilla_e2e::{Proc, Server, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_provisions_a_fleet_in_bulk_and_connects_it() -> anyhow::Result<()> {
    let server = Server::start(&[]).await?;
    let jwt = server.user("fleet@example.com").await?;
    let fleet_dir = server.dir.path().join("fleet");
    let child = server
        .agent_command(&fleet_dir)
        .args(["--heartbeat-secs", "1", "--telemetry-secs", "1"])
        .args([
            "sim",
            "--count",
            "5",
            "--prefix",
            "lab",
            "--api-url",
            &server.http,
            "--email",
            "fleet@example.com",
            "--password",
            "secret-pass",
        ])
        .stdout(std::fs::File::create(server.dir.path().join("sim.out"))?)
        .stderr(Stdio::null())
        .spawn()?;
    let _sim = Proc(child);
    let devices = wait_for(
        "five simulated devices online",
        Duration::from_secs(60),
        || async {
            let (_, list) = server
                .call("GET", "/api/device", Some(&jwt), None)
                .await
                .ok()?;
            let list = list.as_array()?.clone();
            (list.len() == 5 && list.iter().all(|d| d["online"] == true)).then_some(list)
        },
    )
    .await?;
    let ids: Vec<&str> = devices
        .iter()
        .filter_map(|d| d["deviceId"].as_str())
        .collect();
    assert_eq!(
        ids,
        [
            "lab-00000",
            "lab-00001",
            "lab-00002",
            "lab-00003",
            "lab-00004"
        ]
    );
    // Each has its own key and certificate in its own flash directory.
    for id in ids {
        let dir = fleet_dir.join(id);
        assert!(
            dir.join("device.key").exists() && dir.join("device.pem").exists(),
            "{id}"
        );
    }

    // One device reboots on command: the simulator follows it into its new boot and counts
    // it connected again.
    let (s, reboot) = server
        .call(
            "POST",
            "/api/device/lab-00002/commands",
            Some(&jwt),
            Some(serde_json::json!({"name":"reboot","ttlSeconds":600})),
        )
        .await?;
    assert_eq!(s, 202, "{reboot}");
    let command = format!(
        "/api/device/lab-00002/commands/{}",
        reboot["id"].as_str().unwrap()
    );
    wait_for(
        "the reboot command succeeded",
        Duration::from_secs(15),
        || async {
            let (_, c) = server.call("GET", &command, Some(&jwt), None).await.ok()?;
            (c["state"] == "succeeded").then_some(())
        },
    )
    .await?;
    wait_for(
        "lab-00002 back after its reboot",
        Duration::from_secs(30),
        || async {
            let d = server.device(&jwt, "lab-00002").await.ok()?;
            (d["online"] == true && d["uptime"].as_u64()? < 5).then_some(())
        },
    )
    .await?;
    let progress = || {
        std::fs::read_to_string(server.dir.path().join("sim.out"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["event"] == "progress")
            .collect::<Vec<_>>()
    };
    let seen = progress().len();
    wait_for(
        "the simulator counting all five connected after the reboot",
        Duration::from_secs(10),
        || {
            let lines = progress();
            async move {
                lines
                    .iter()
                    .skip(seen)
                    .any(|l| l["connected"] == 5)
                    .then_some(())
            }
        },
    )
    .await?;
    Ok(())
}
