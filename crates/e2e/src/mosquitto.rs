//! A Mosquitto 2.0 the test starts as the external broker of scale mode: two mutual-TLS
//! listeners (devices; the server's service clients), identity from the certificate
//! (`use_identity_as_username`) and the client id from the identity
//! (`use_username_as_clientid`, so no client can take over another's session), a pattern
//! ACL on `%u`, least-privilege users for the server's two clients, persistence on. The same
//! settings are documented for operators in docs/operations.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::Proc;

pub struct Mosquitto {
    pub proc: Proc,
    pub device_port: u16,
    pub service_port: u16,
    conf: PathBuf,
    log: PathBuf,
}

/// The files a broker started by [`Mosquitto::start_synced`] reads, as
/// `flotilla-server broker-sync` writes them.
pub struct BrokerFiles {
    /// The ACL broker-sync starts from (the one [`Mosquitto::start`] uses as is).
    pub acl_base: PathBuf,
    pub acl: PathBuf,
    pub crl: PathBuf,
    pub pid: PathBuf,
}

impl BrokerFiles {
    /// Copies the CA and the server's certificate and key from `tls_dir` (`ca.pem`,
    /// `server.pem`, `server.key`; copied, so the server may rewrite its own) into `dir` and
    /// writes the base ACL for replica `replica`.
    pub fn prepare(dir: &Path, tls_dir: &Path, replica: &str) -> Result<BrokerFiles> {
        std::fs::create_dir_all(dir.join("persistence"))?;
        for f in ["ca.pem", "server.pem", "server.key"] {
            std::fs::copy(tls_dir.join(f), dir.join(f)).with_context(|| format!("copying {f}"))?;
        }
        let files = BrokerFiles {
            acl_base: dir.join("acl.base"),
            acl: dir.join("acl"),
            crl: dir.join("crl.pem"),
            pid: dir.join("mosquitto.pid"),
        };
        std::fs::write(&files.acl_base, acl(replica))?;
        Ok(files)
    }
}

/// Device rights by username (= certificate CN); a replica's ingest client reads what
/// devices send, its downlink writes what they receive. (Mosquitto's ACL cannot say which
/// topics may be retained.)
pub fn acl(replica: &str) -> String {
    acl_for(&[replica])
}

/// [`acl`] for several replicas: the device patterns once, each replica's two clients.
pub fn acl_for(replicas: &[&str]) -> String {
    let mut out = String::from(
        "pattern write devices/%u/health
pattern write devices/%u/status
pattern write devices/%u/telemetry
pattern write devices/%u/reply
pattern write devices/%u/ota/status
pattern read devices/%u/command
pattern read devices/%u/ota
pattern read devices/%u/config
",
    );
    for replica in replicas {
        out.push_str(&format!(
            "
user svc:server-ingest-{replica}
topic read devices/+/health
topic read devices/+/status
topic read devices/+/telemetry
topic read devices/+/reply
topic read devices/+/ota/status

user svc:server-downlink-{replica}
topic write devices/+/command
topic write devices/+/ota
topic write devices/+/config
"
        ));
    }
    out
}
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Mosquitto {
    /// Starts Mosquitto in `dir` with the CA, certificate and key found in `tls_dir`
    /// (`ca.pem`, `server.pem`, `server.key`; copied, so the server may rewrite its own),
    /// for the server replica `replica`.
    pub async fn start(dir: &Path, tls_dir: &Path, replica: &str) -> Result<Mosquitto> {
        let files = BrokerFiles::prepare(dir, tls_dir, replica)?;
        std::fs::copy(&files.acl_base, &files.acl)?;
        Self::launch(dir, &files, false).await
    }

    /// [`Mosquitto::start`] for several server replicas sharing the broker.
    pub async fn start_for_replicas(
        dir: &Path,
        tls_dir: &Path,
        replicas: &[&str],
    ) -> Result<Mosquitto> {
        let files = BrokerFiles::prepare(dir, tls_dir, replicas.first().copied().unwrap_or("r1"))?;
        std::fs::write(&files.acl, acl_for(replicas))?;
        Self::launch(dir, &files, false).await
    }

    /// Starts Mosquitto on the ACL and CRL (`crlfile`) that broker-sync wrote into `files`
    /// (it must have written them: Mosquitto does not start without its CRL), writing its pid
    /// to `files.pid` for broker-sync's SIGHUP.
    pub async fn start_synced(dir: &Path, files: &BrokerFiles) -> Result<Mosquitto> {
        Self::launch(dir, files, true).await
    }

    async fn launch(dir: &Path, files: &BrokerFiles, crl: bool) -> Result<Mosquitto> {
        let (device_port, service_port) = (free_port()?, free_port()?);
        let crlfile = if crl {
            format!("crlfile {}\n", files.crl.display())
        } else {
            String::new()
        };
        let tls = format!(
            "cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nrequire_certificate true\nuse_identity_as_username true\nuse_username_as_clientid true\n{crlfile}",
            d = dir.display()
        );
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nallow_anonymous false\nacl_file {acl}\npid_file {pid}\n\
                 persistence true\npersistence_location {d}/persistence/\n\
                 # Messages queued for a session (the server's ingest while it is away): the\n\
                 # default of 1,000 drops the rest silently, after the devices got PUBACK.\n\
                 max_queued_messages 1000000\nmax_inflight_messages 1024\n\
                 # A device message is at most 4 KiB; the rest is topic and header.\n\
                 max_packet_size 8192\n\
                 log_dest file {d}/mosquitto.log\nlog_type error\nlog_type warning\nlog_type notice\n\
                 # Read the 0600 server key as its owner instead of dropping to the mosquitto user.\n\
                 user {user}\n\
                 listener {device_port} 127.0.0.1\n{tls}\
                 listener {service_port} 127.0.0.1\n{tls}",
                d = dir.display(),
                acl = files.acl.display(),
                pid = files.pid.display(),
                user = std::env::var("USER").unwrap_or_else(|_| "root".into()),
            ),
        )?;
        let mut m = Mosquitto {
            proc: spawn(&conf)?,
            device_port,
            service_port,
            conf,
            log: dir.join("mosquitto.log"),
        };
        m.wait_listening().await?;
        Ok(m)
    }

    /// Stops Mosquitto with SIGTERM (it saves its persistence file) and starts it again on
    /// the same ports and data.
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.terminate();
        self.proc = spawn(&self.conf)?;
        self.wait_listening().await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_listening(&mut self) -> Result<()> {
        let ports = [self.device_port, self.service_port];
        crate::wait_for(
            "mosquitto listening",
            Duration::from_secs(10),
            || async move {
                for p in ports {
                    tokio::net::TcpStream::connect(("127.0.0.1", p))
                        .await
                        .ok()?;
                }
                Some(())
            },
        )
        .await
    }
}

fn spawn(conf: &Path) -> Result<Proc> {
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto")?;
    Ok(Proc(child))
}
