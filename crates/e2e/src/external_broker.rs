//! The external-broker run of the end-to-end suite (`FLOTILLA_E2E_BROKER=mosquitto`): every
//! server a test starts runs behind a Mosquitto 2.0 of its own, as scale mode runs. The
//! server's CA issues the broker's certificate, `flotilla-server broker-sync` keeps the
//! broker's ACL and CRL (revocation and blocking reach it), devices connect to its device
//! listener and the server's ingest and downlink to its service listener; replicas a test
//! starts share it. A test of what only the embedded broker does is skipped in this run by
//! [`embedded_only`], which says why.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};

use crate::Proc;
use crate::mosquitto::{BrokerFiles, Mosquitto, acl_for};

/// Whether this run puts every server behind an external Mosquitto.
pub fn enabled() -> bool {
    std::env::var("FLOTILLA_E2E_BROKER").is_ok_and(|v| v == "mosquitto")
}

/// True when this is the external-broker run: the calling test checks something only the
/// embedded broker does and returns at once. The reason goes to the file
/// `FLOTILLA_E2E_SKIPS` names, with the test's name, for scripts/test to print (the test
/// harness shows nothing a passing test prints).
pub fn embedded_only(why: &str) -> bool {
    if !enabled() {
        return false;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    eprintln!("{test}: skipped behind an external broker: {why}");
    if let Some(path) = std::env::var_os("FLOTILLA_E2E_SKIPS") {
        use std::io::Write;
        let line = format!("{test}: {why}\n");
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            eprintln!("FLOTILLA_E2E_SKIPS: {e}");
        }
    }
    true
}

/// Replica ids the harness broker's ACL admits.
const REPLICAS: [&str; 3] = ["r1", "r2", "r3"];

struct Shared {
    mosquitto: Mosquitto,
    files: BrokerFiles,
    /// Declared after the broker: broker-sync stops after it.
    _sync: Proc,
    started_replicas: AtomicUsize,
    /// The broker's files (config, ACL, CRL, persistence, logs), its own: they outlive
    /// whichever of the replicas sharing it is dropped first.
    _dir: tempfile::TempDir,
}

/// The Mosquitto one test's servers run behind, and which replica a server is.
#[derive(Clone)]
pub struct HarnessBroker {
    shared: Arc<Shared>,
    pub replica: String,
}

impl HarnessBroker {
    /// Starts Mosquitto and broker-sync for the server whose data dir will be `dir/server`
    /// (its CA is made here if it is not there yet), with the server's environment `env`.
    pub async fn start(dir: &Path, env: &[(String, String)]) -> Result<HarnessBroker> {
        let data = dir.join("server");
        let own = tempfile::tempdir()?;
        let dir = own.path();
        let broker_dir = dir.join("broker");
        let issued = broker_dir.join("issued");
        std::fs::create_dir_all(&issued)?;
        let log = dir.join("broker-sync.log");
        let server = |args: &[&str]| -> Result<()> {
            let status = Command::new(crate::server_bin())
                .arg("--data-dir")
                .arg(&data)
                .args(args)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .status()
                .with_context(|| format!("flotilla-server {}", args.join(" ")))?;
            anyhow::ensure!(
                status.success(),
                "flotilla-server {}: {status}",
                args.join(" ")
            );
            Ok(())
        };
        let out_dir = issued.display().to_string();
        server(&[
            "admin",
            "broker-cert",
            "--create-ca",
            "--host",
            "localhost",
            "--out-dir",
            &out_dir,
        ])?;
        std::fs::copy(data.join(flotilla_pki::CA_CERT_FILE), issued.join("ca.pem"))?;
        std::fs::rename(issued.join("broker.pem"), issued.join("server.pem"))?;
        std::fs::rename(issued.join("broker.key"), issued.join("server.key"))?;
        let files = BrokerFiles::prepare(&broker_dir, &issued, REPLICAS[0])?;
        std::fs::write(&files.acl_base, acl_for(&REPLICAS))?;
        let sync_args = [
            "--acl-base".to_string(),
            files.acl_base.display().to_string(),
            "--acl-file".into(),
            files.acl.display().to_string(),
            "--crl-file".into(),
            files.crl.display().to_string(),
        ];
        let mut once: Vec<&str> = vec!["broker-sync"];
        once.extend(sync_args.iter().map(String::as_str));
        once.push("--once");
        // Mosquitto does not start without its CRL: one pass first.
        server(&once)?;
        let mosquitto = Mosquitto::start_synced(&broker_dir, &files).await?;
        let log = std::fs::OpenOptions::new().append(true).open(&log)?;
        let sync = Command::new(crate::server_bin())
            .arg("--data-dir")
            .arg(&data)
            .arg("broker-sync")
            .args(&sync_args)
            .arg("--broker-pid-file")
            .arg(&files.pid)
            .args(["--interval", "1", "--broker-device-url"])
            .arg(format!("mqtts://localhost:{}", mosquitto.device_port))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting broker-sync")?;
        Ok(HarnessBroker {
            shared: Arc::new(Shared {
                mosquitto,
                files,
                _sync: Proc(sync),
                started_replicas: AtomicUsize::new(1),
                _dir: own,
            }),
            replica: REPLICAS[0].into(),
        })
    }

    /// The same broker for the next replica (r2, then r3).
    pub fn for_replica(&self) -> Result<HarnessBroker> {
        let n = self.shared.started_replicas.fetch_add(1, Ordering::Relaxed);
        let replica = REPLICAS
            .get(n)
            .context("the harness broker admits three replicas")?;
        Ok(HarnessBroker {
            shared: self.shared.clone(),
            replica: replica.to_string(),
        })
    }

    pub fn mosquitto(&self) -> &Mosquitto {
        &self.shared.mosquitto
    }

    pub fn device_port(&self) -> u16 {
        self.shared.mosquitto.device_port
    }

    /// The ACL broker-sync writes for the broker.
    pub fn acl_file(&self) -> &Path {
        &self.shared.files.acl
    }
}

/// The harness broker a server with arguments `extra` runs behind: `broker`, unless the test
/// names a broker of its own.
pub(crate) fn in_use<'a>(
    broker: Option<&'a HarnessBroker>,
    extra: &[&str],
) -> Option<&'a HarnessBroker> {
    broker.filter(|_| !extra.contains(&"--broker-url"))
}

/// A server's arguments: the test's own, plus the harness broker and the replica id when it
/// runs behind one ([`in_use`]).
pub(crate) fn args(broker: Option<&HarnessBroker>, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    if let Some(broker) = in_use(broker, extra) {
        args.extend([
            "--broker-url".into(),
            format!("mqtts://localhost:{}", broker.shared.mosquitto.service_port),
            "--replica-id".into(),
            broker.replica.clone(),
        ]);
    }
    args
}
