//! `flotilla-server --demo N`: one command brings up the platform with a working fleet.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use flotilla_e2e::{Server, wait_for};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_flag_runs_a_provisioned_fleet_beside_the_server() -> anyhow::Result<()> {
    if flotilla_e2e::external_broker::enabled() {
        // --demo runs its devices on the embedded broker: with --broker-url it refuses to start.
        assert!(Server::start(&["--demo", "3"]).await.is_err());
        return Ok(());
    }
    let server = Server::start(&["--demo", "3"]).await?;
    let creds_path = server.data_dir().join("demo-credentials.json");
    let creds: Value = wait_for("demo credentials", Duration::from_secs(10), || {
        let c = std::fs::read(&creds_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        async move { c }
    })
    .await?;
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&creds_path)?.permissions());
    assert_eq!(mode & 0o777, 0o600);
    let jwt = server
        .login(
            creds["email"].as_str().unwrap(),
            creds["password"].as_str().unwrap(),
        )
        .await?;
    wait_for(
        "three demo devices online",
        Duration::from_secs(60),
        || async {
            let (_, d) = server
                .call("GET", "/api/dashboard", Some(&jwt), None)
                .await
                .ok()?;
            (d["total"] == 3 && d["online"] == 3).then_some(())
        },
    )
    .await?;
    assert!(
        !server.log().contains(creds["password"].as_str().unwrap()),
        "the demo password must not be logged"
    );
    Ok(())
}
