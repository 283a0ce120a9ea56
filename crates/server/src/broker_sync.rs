//! `flotilla-server broker-sync`: makes an external Mosquitto refuse what the server refuses.
//! The embedded broker asks the server at every CONNECT; Mosquitto cannot, so this writes what
//! it must refuse into the two files it reads, and signals it (SIGHUP) to read them again:
//!
//! - a CRL of revoked device certificates (`crlfile`): a reconnect with one fails the TLS
//!   handshake;
//! - the operator's ACL with a `topic deny #` block per device that is blocked or left without
//!   a valid certificate (`acl_file`): a denied device can publish and receive nothing.
//!
//! Mosquitto checks the CRL only at the handshake, so a session that was open before keeps
//! going. With `--broker-device-url`, a device that was blocked, revoked or re-provisioned has
//! that session taken over: broker-sync connects once as the device (a certificate with its
//! name from the CA, valid minutes, never recorded), and the broker, which takes client ids
//! from certificates, closes the old session. Without it, a re-provisioned device's old
//! session keeps its rights until it disconnects. A takeover that fails is tried again at
//! every pass until it succeeds, and what was last seen (and what is still to take over) is
//! kept beside the CRL (`<crl_file>.sessions.json`), so a restart of broker-sync misses no
//! change made while it was down.
//!
//! It runs beside the broker (it needs to signal it and write its files), reads the database
//! every `--interval`, and rewrites and signals only when something changed, or when the CRL
//! is a seventh of its validity old: a broker holding a CRL past its next update refuses every
//! device, so a sync that stops fails closed after `--crl-validity-days`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use flotilla_pki::{CertificateAuthority, Revocation};
use flotilla_proto::DeviceId;
use flotilla_store::{BrokerDenials, RevokeReason, Store};

#[derive(Debug, Clone, Args)]
pub struct BrokerSyncArgs {
    /// The operator's ACL (device patterns, the replicas' service users); the denials are
    /// appended to it.
    #[arg(long)]
    pub acl_base: PathBuf,
    /// The file Mosquitto reads as `acl_file`.
    #[arg(long)]
    pub acl_file: PathBuf,
    /// The file Mosquitto reads as `crlfile`.
    #[arg(long)]
    pub crl_file: PathBuf,
    /// Mosquitto's `pid_file`: it gets SIGHUP after each change. Without it nothing is
    /// signalled (for a broker reloaded some other way).
    #[arg(long)]
    pub broker_pid_file: Option<PathBuf>,
    /// Seconds between reads of the database.
    #[arg(long, default_value_t = 2)]
    pub interval: u64,
    /// How long each CRL is valid; it is re-issued after a seventh of that.
    #[arg(long, default_value_t = 7)]
    pub crl_validity_days: u32,
    /// Write the files (and signal) once, then exit.
    #[arg(long)]
    pub once: bool,
    /// The broker's device listener, `mqtts://host:port`: open sessions of devices that were
    /// blocked, revoked or re-provisioned are taken over there (closed).
    #[arg(long)]
    pub broker_device_url: Option<crate::config::BrokerUrl>,
}

/// The marker line between the operator's ACL and what this writes.
const DENIALS_HEADER: &str =
    "# Written by flotilla-server broker-sync: devices refused everything (blocked or revoked).";

/// The ACL Mosquitto reads: the operator's, then a deny-everything block per denied device.
/// Mosquitto checks a user's `deny` entries before any `pattern`, so these win over the
/// device patterns of the base.
pub fn acl_text(base: &str, denied: &[DeviceId]) -> String {
    let mut acl = base.trim_end().to_string();
    acl.push_str("\n\n");
    acl.push_str(DENIALS_HEADER);
    acl.push('\n');
    for device in denied {
        // DeviceId allows only [A-Za-z0-9_-]: nothing here can start a new ACL line.
        acl.push_str(&format!("user {device}\ntopic deny #\n"));
    }
    acl
}

fn revocations(denials: &BrokerDenials) -> Vec<Revocation> {
    denials
        .revoked
        .iter()
        .map(|r| Revocation {
            serial_hex: r.serial_hex.clone(),
            revoked_at_unix: r.revoked_at / 1000,
            superseded: r.reason == RevokeReason::Superseded,
        })
        .collect()
}

/// What was last written, to write and signal only on a change.
struct Written {
    acl: String,
    revoked: Vec<String>,
    crl_issued: Instant,
}

/// Each device's (blocked, current serial), to see whose session must end.
type Sessions = HashMap<String, (bool, Option<String>)>;

/// What broker-sync remembers across its restarts: the last snapshot it acted on, and the
/// takeovers that have not succeeded yet.
#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct SessionState {
    seen: Sessions,
    pending: BTreeSet<String>,
}

fn state_path(crl_file: &Path) -> PathBuf {
    let mut name = crl_file.as_os_str().to_owned();
    name.push(".sessions.json");
    PathBuf::from(name)
}

impl SessionState {
    /// `None` on the first run ever (nothing to compare with yet).
    fn load(path: &Path) -> anyhow::Result<Option<SessionState>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("reading broker-sync's state {}", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        replace_file(path, &serde_json::to_vec(self)?)
    }

    /// The sessions to take over now: those ended since the last snapshot and those whose
    /// takeover failed before.
    fn to_take_over(&self, now: &Sessions) -> Vec<String> {
        let mut due: BTreeSet<String> = sessions_to_end(&self.seen, now).into_iter().collect();
        due.extend(self.pending.iter().cloned());
        due.into_iter().collect()
    }
}

/// Devices whose open session must end since `before`: blocked now, or holding another
/// certificate (or none) than then. A renewal counts: the session open may be one made with
/// the old certificate (a confirm over HTTPS says nothing about it), so it is ended and the
/// device reconnects with the new one. Devices new since then had no session to end.
fn sessions_to_end(before: &Sessions, now: &Sessions) -> Vec<String> {
    let mut ended: Vec<String> = now
        .iter()
        .filter(|(id, (blocked, serial))| {
            before.get(*id).is_some_and(|(was_blocked, was_serial)| {
                (*blocked && !was_blocked) || (was_serial.is_some() && serial != was_serial)
            })
        })
        .map(|(id, _)| id.clone())
        .collect();
    ended.sort();
    ended
}

pub async fn run(
    store: Store,
    ca: CertificateAuthority,
    broker_ca_pem: String,
    args: BrokerSyncArgs,
) -> anyhow::Result<()> {
    let base = std::fs::read_to_string(&args.acl_base)
        .with_context(|| format!("reading the base ACL {}", args.acl_base.display()))?;
    let validity = Duration::from_secs(u64::from(args.crl_validity_days.max(1)) * 86_400);
    let mut written: Option<Written> = None;
    let state_file = state_path(&args.crl_file);
    let mut sessions = SessionState::load(&state_file)?;
    loop {
        // Read before the files are written: a change after this read is seen next pass.
        let snapshot = match &args.broker_device_url {
            Some(_) => Some(store.gate_snapshot().await.map(|rows| {
                rows.into_iter()
                    .map(|r| (r.device_id, (r.blocked, r.serial)))
                    .collect::<Sessions>()
            })),
            None => None,
        };
        match sync_once(&store, &ca, &base, &args, validity, written.as_ref()).await {
            Ok(Some(now)) => written = Some(now),
            Ok(None) => {}
            Err(e) if args.once => return Err(e),
            // The broker keeps what it has; the next tick tries again.
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "broker-sync failed; retrying"),
        }
        // After the files, so the device's reconnect meets the new CRL and ACL.
        match (snapshot, &args.broker_device_url) {
            (Some(Ok(now)), Some(url)) => {
                let mut pending = BTreeSet::new();
                if let Some(before) = &sessions {
                    for device in before.to_take_over(&now) {
                        match take_over(url, &ca, &broker_ca_pem, &device).await {
                            Ok(()) => {
                                tracing::info!(device_id = %device, "device session at the broker taken over")
                            }
                            Err(e) => {
                                tracing::warn!(device_id = %device, error = %format!("{e:#}"), "taking over a device session failed; retrying at the next pass");
                                pending.insert(device);
                            }
                        }
                    }
                }
                let state = SessionState { seen: now, pending };
                // Written when it changed, not every pass.
                if sessions.as_ref() != Some(&state)
                    && let Err(e) = state.save(&state_file)
                {
                    tracing::warn!(error = %format!("{e:#}"), "saving broker-sync's state failed");
                }
                sessions = Some(state);
            }
            (Some(Err(e)), _) => tracing::warn!(error = %e, "reading devices failed"),
            _ => {}
        }
        if args.once {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(args.interval.max(1))).await;
    }
}

/// One pass: what changed since `last` is written and signalled; `None` when nothing did.
async fn sync_once(
    store: &Store,
    ca: &CertificateAuthority,
    base: &str,
    args: &BrokerSyncArgs,
    validity: Duration,
    last: Option<&Written>,
) -> anyhow::Result<Option<Written>> {
    let denials = store.broker_denials().await?;
    let acl = acl_text(base, &denials.denied_devices);
    let revoked: Vec<String> = denials
        .revoked
        .iter()
        .map(|r| r.serial_hex.clone())
        .collect();
    let crl_due =
        last.is_none_or(|w| w.revoked != revoked || w.crl_issued.elapsed() > validity / 7);
    let acl_due = last.is_none_or(|w| w.acl != acl);
    if !crl_due && !acl_due {
        return Ok(None);
    }
    let crl_issued = if crl_due {
        let now = time::OffsetDateTime::now_utc();
        // Unix ms: grows from one list to the next, across restarts of this command too.
        let number = u64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let pem = ca.revocation_list(
            &revocations(&denials),
            now,
            time::Duration::try_from(validity)?,
            number,
        )?;
        replace_file(&args.crl_file, pem.as_bytes())?;
        Instant::now()
    } else {
        last.map_or_else(Instant::now, |w| w.crl_issued)
    };
    if acl_due {
        replace_file(&args.acl_file, acl.as_bytes())?;
    }
    if let Some(pid_file) = &args.broker_pid_file {
        signal_reload(pid_file)?;
    }
    tracing::info!(
        denied_devices = denials.denied_devices.len(),
        revoked_certificates = revoked.len(),
        crl = crl_due,
        acl = acl_due,
        "broker files written"
    );
    Ok(Some(Written {
        acl,
        revoked,
        crl_issued,
    }))
}

/// Connects to the broker as `device` (clean start, no will, no subscription) and leaves: the
/// broker closes whatever session the device had open. Bounded by a deadline.
async fn take_over(
    url: &crate::config::BrokerUrl,
    ca: &CertificateAuthority,
    broker_ca_pem: &str,
    device: &str,
) -> anyhow::Result<()> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event};
    let cert = ca.issue_takeover_certificate(device, time::Duration::minutes(5))?;
    // The same client set-up as the server's own links (clean start, TLS with a client
    // certificate), under the device's name.
    let mut link = crate::service_link::ServiceLink {
        host: url.host.clone(),
        port: url.port,
        ca_pem: broker_ca_pem.to_string(),
        identity: crate::rotation::fixed(cert),
    };
    let (client, mut events) = AsyncClient::new(link.options(device), 4);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await? {
                break;
            }
        }
        client.disconnect().await?;
        // Until the DISCONNECT is out (the loop then ends the connection).
        while events.poll().await.is_ok() {}
        anyhow::Ok(())
    })
    .await
    .context("the broker did not answer in 10 s")?
}

/// Replaces `path` whole (a temporary file renamed over it), so the broker never reads half a
/// file. World-readable: neither a CRL nor an ACL is secret, and Mosquitto reads them as its
/// own user.
fn replace_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("flotilla-tmp");
    {
        use std::io::Write;
        let mut file =
            std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        file.write_all(contents)?;
        // On disk before the rename: after a power cut the broker finds the old file or the
        // new one, never an empty or torn one.
        file.sync_all()?;
    }
    #[cfg(unix)]
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

fn signal_reload(pid_file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(pid_file)
        .with_context(|| format!("reading the broker's pid file {}", pid_file.display()))?;
    let pid = text
        .trim()
        .parse::<i32>()
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .with_context(|| format!("{} holds no process id", pid_file.display()))?;
    // Without the broker's process in view (no shared process namespace), its pid may name
    // this process or none.
    anyhow::ensure!(
        pid.as_raw_nonzero().get() != std::process::id() as i32,
        "{} names this process, not the broker",
        pid_file.display()
    );
    rustix::process::kill_process(pid, rustix::process::Signal::HUP)
        .with_context(|| format!("signalling the broker (pid {})", pid.as_raw_nonzero()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn sessions_end_when_a_device_is_blocked_revoked_or_given_another_certificate() {
        let s = |rows: &[(&str, bool, Option<&str>)]| -> Sessions {
            rows.iter()
                .map(|(id, b, serial)| (id.to_string(), (*b, serial.map(String::from))))
                .collect()
        };
        let before = s(&[
            ("kept", false, Some("1")),
            ("blocked", false, Some("2")),
            ("unblocked", true, Some("3")),
            ("revoked", false, Some("4")),
            ("reprovisioned", false, Some("5")),
            ("provisioned", false, None),
            ("renewing", false, Some("9")),
            ("renewed", false, Some("b")),
        ]);
        let now = s(&[
            ("kept", false, Some("1")),
            ("blocked", true, Some("2")),
            ("unblocked", false, Some("3")),
            ("revoked", false, None),
            ("reprovisioned", false, Some("6")),
            ("provisioned", false, Some("7")),
            ("new", false, Some("8")),
            ("renewing", false, Some("9")),
            // Renewed: the session may still be one made with the old certificate.
            ("renewed", false, Some("c")),
        ]);
        assert_eq!(
            sessions_to_end(&before, &now),
            ["blocked", "renewed", "reprovisioned", "revoked"]
        );
        assert!(sessions_to_end(&now, &now).is_empty());
    }

    #[test]
    fn a_failed_takeover_is_tried_again_and_a_restart_remembers_what_it_saw() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(&dir.path().join("crl.pem"));
        assert_eq!(SessionState::load(&path).unwrap(), None);
        let seen: Sessions = [("stolen".to_string(), (false, Some("5".to_string())))].into();
        let reprovisioned: Sessions =
            [("stolen".to_string(), (false, Some("6".to_string())))].into();
        // The pass that saw the change failed to take the session over: it stays pending,
        // though the next snapshot shows nothing new.
        let state = SessionState {
            seen: reprovisioned.clone(),
            pending: ["stolen".to_string()].into(),
        };
        assert_eq!(state.to_take_over(&reprovisioned), ["stolen"]);
        // broker-sync restarts: it compares with what it saw before, not with nothing.
        state.save(&path).unwrap();
        let loaded = SessionState::load(&path).unwrap().unwrap();
        assert_eq!(loaded, state);
        assert_eq!(loaded.to_take_over(&reprovisioned), ["stolen"]);
        let before_restart = SessionState {
            seen,
            pending: BTreeSet::new(),
        };
        before_restart.save(&path).unwrap();
        let loaded = SessionState::load(&path).unwrap().unwrap();
        assert_eq!(loaded.to_take_over(&reprovisioned), ["stolen"]);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(SessionState::load(&path).is_err());
    }

    #[test]
    fn the_acl_is_the_base_then_one_deny_block_per_denied_device() {
        let base = "pattern write devices/%u/telemetry\n\n\n";
        let acl = acl_text(base, &[id("dev-a"), id("dev_b")]);
        assert_eq!(
            acl,
            format!(
                "pattern write devices/%u/telemetry\n\n{DENIALS_HEADER}\nuser dev-a\ntopic deny #\nuser dev_b\ntopic deny #\n"
            )
        );
        assert!(acl_text(base, &[]).ends_with(&format!("{DENIALS_HEADER}\n")));
    }
}
