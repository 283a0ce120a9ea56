//! Retention: the leader removes, every `--retention-interval`, what the configured ages say
//! is old (telemetry by age and per-device count, OTA events, finished commands, spent tokens,
//! dead letters, exported audit records), in batches with a pause between them so ingest gets
//! the write lock, and marks the audit chain's head with a signed checkpoint. Ages compare
//! with stored wall-clock timestamps; the interval runs on the monotonic clock.

use std::sync::Arc;
use std::time::Duration;

use flotilla_audit::{Break, Checkpoint, Hash, Verifier};
use flotilla_pki::CertificateAuthority;
use flotilla_store::{AuditHead, AuditRecord, RetentionKind, Store, StoreError, StoreResult};

use crate::config::RetentionConfig;
use crate::leader::{Leadership, Sweep};

/// Between two batches, so a writer waiting for the lock gets it.
const PAUSE: Duration = Duration::from_millis(10);
/// Devices read per page while capping readings per device.
const DEVICE_PAGE: i64 = 500;
/// Audit records read per page while checking the chain before its head is signed.
const AUDIT_PAGE: i64 = 1_000;

pub fn spawn(
    store: Store,
    ca: Arc<CertificateAuthority>,
    config: RetentionConfig,
    leadership: Leadership,
) {
    tokio::spawn(async move {
        let interval = Duration::from_secs(config.interval_secs);
        tokio::time::sleep(interval.min(Duration::from_secs(60))).await;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !leadership.is_leader() {
                continue;
            }
            let now = flotilla_store::now_ms();
            match run_once(&store, &ca, &config, &leadership, now).await {
                Ok(removed) if removed.iter().any(|(_, n)| *n > 0) => {
                    tracing::info!(?removed, "retention removed old rows");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "retention run failed"),
            }
        }
    });
}

impl RetentionConfig {
    fn age_of(&self, kind: RetentionKind) -> Option<Duration> {
        match kind {
            RetentionKind::Telemetry => self.telemetry.0,
            RetentionKind::OtaEvents => self.ota_events.0,
            RetentionKind::FinishedCommands => self.commands.0,
            RetentionKind::SpentTokens => self.tokens.0,
            RetentionKind::DeadLetters => self.dead_letters.0,
        }
    }
}

fn before(now: i64, age: Duration) -> i64 {
    now.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
}

/// What a run removed, kind by kind, and the first error it met.
#[derive(Default)]
struct Run {
    removed: Vec<(&'static str, u64)>,
    failed: Option<StoreError>,
}

impl Run {
    /// Keeps what one kind removed (in `/api/admin/stats` at once, so a later failure does
    /// not lose it), or its error; the run goes on with the next kind either way.
    async fn note(&mut self, store: &Store, now: i64, kind: &'static str, r: StoreResult<u64>) {
        let r = match r {
            Ok(n) => store.record_retention_run(kind, now, n).await.map(|()| n),
            Err(e) => Err(e),
        };
        match r {
            Ok(n) => self.removed.push((kind, n)),
            Err(e) => {
                tracing::warn!(kind, error = %e, "retention of one kind failed");
                self.failed.get_or_insert(e);
            }
        }
    }
}

/// One run at wall-clock `now`: what it removed, per kind (`telemetryPerDevice` and `audit`
/// beside the [`RetentionKind`]s), or the first error after every kind was tried and the head
/// marked. Stops early when this server stops leading.
pub async fn run_once(
    store: &Store,
    ca: &CertificateAuthority,
    config: &RetentionConfig,
    leadership: &Leadership,
    now: i64,
) -> StoreResult<Vec<(&'static str, u64)>> {
    let mut run = Run::default();
    for kind in RetentionKind::ALL {
        let Some(age) = config.age_of(kind) else {
            continue;
        };
        let expired = Batch::Expired(kind, before(now, age));
        let r = drain(store, leadership, config.batch, expired).await;
        run.note(store, now, kind.as_str(), r).await;
    }
    if config.telemetry_per_device > 0 {
        let r = cap_readings_per_device(store, config, leadership).await;
        run.note(store, now, "telemetryPerDevice", r).await;
    }
    if let Some(age) = config.audit.0 {
        // Records are removed (and a checkpoint signed over them) only from a chain that holds
        // into its head, and over a range checked in full.
        let r = match check_chain(store, ca).await {
            Ok(()) => remove_exported_audit(store, ca, leadership, before(now, age), now).await,
            Err(e) => Err(e),
        };
        run.note(store, now, "audit", r).await;
    }
    let marked = mark_audit_head(store, ca, leadership, now).await;
    match run.failed {
        Some(e) => Err(e),
        None => marked.map(|()| run.removed),
    }
}

/// One statement's worth of removal.
#[derive(Clone, Copy)]
enum Batch<'a> {
    Expired(RetentionKind, i64),
    Trim(&'a flotilla_proto::DeviceId, u64),
}

/// Runs `batch` until it deletes fewer than a batch of rows or this server stops leading.
async fn drain(
    store: &Store,
    leadership: &Leadership,
    size: i64,
    batch: Batch<'_>,
) -> StoreResult<u64> {
    let mut total = 0;
    loop {
        // Each batch in a transaction fenced by the lease: a replica that lost it (paused,
        // cut off) deletes nothing under its own settings after another took over.
        let n = match leadership.sweep(store).await? {
            None => break,
            Some(Sweep::Alone(store)) => match batch {
                Batch::Expired(kind, cutoff) => store.delete_expired(kind, cutoff, size).await?,
                Batch::Trim(device, keep) => {
                    store.trim_device_telemetry(device, keep, size).await?
                }
            },
            Some(Sweep::Fenced(mut tx)) => {
                let n = match batch {
                    Batch::Expired(kind, cutoff) => tx.delete_expired(kind, cutoff, size).await?,
                    Batch::Trim(device, keep) => {
                        tx.trim_device_telemetry(device, keep, size).await?
                    }
                };
                tx.commit().await?;
                n
            }
        };
        total += n;
        if n < size as u64 {
            break;
        }
        tokio::time::sleep(PAUSE).await;
    }
    Ok(total)
}

async fn cap_readings_per_device(
    store: &Store,
    config: &RetentionConfig,
    leadership: &Leadership,
) -> StoreResult<u64> {
    let (mut total, mut after) = (0, None);
    loop {
        let page = store.device_ids_after(after.as_ref(), DEVICE_PAGE).await?;
        for device in &page {
            let trim = Batch::Trim(device, config.telemetry_per_device);
            total += drain(store, leadership, config.batch, trim).await?;
        }
        match page.last() {
            Some(last) if page.len() as i64 == DEVICE_PAGE && leadership.is_leader() => {
                after = Some(last.clone());
            }
            _ => return Ok(total),
        }
    }
}

fn checkpoint(
    ca: &CertificateAuthority,
    seq: u64,
    hash: &Hash,
    at: i64,
    removed: u64,
) -> StoreResult<Checkpoint> {
    let signature = ca
        .sign_statement(&Checkpoint::statement(seq, hash, at, removed))
        .map_err(|e| StoreError::Refused(format!("signing an audit checkpoint: {e}").into()))?;
    Ok(Checkpoint {
        seq,
        hash: flotilla_audit::to_hex(hash),
        at,
        removed,
        signature: hex::encode(signature),
    })
}

/// Removes the exported audit records written before `cutoff`, leaving a signed checkpoint
/// in their place, and audits that it did.
async fn remove_exported_audit(
    store: &Store,
    ca: &CertificateAuthority,
    leadership: &Leadership,
    cutoff: i64,
    now: i64,
) -> StoreResult<u64> {
    let Some(removal) = store.audit_removal(cutoff).await? else {
        return Ok(0);
    };
    // The records to go are those since the last removal: checked into the one the new
    // checkpoint will vouch for, so it never signs over an edited record.
    let last_removal = store
        .audit_checkpoints()
        .await?
        .into_iter()
        .rfind(|c| c.removed > 0 && c.seq < removal.seq);
    let through = AuditHead {
        seq: removal.seq,
        hash: removal.hash,
        exported_through: removal.seq,
    };
    held_since(store, ca, last_removal.as_ref(), &through).await?;
    let signed = checkpoint(ca, removal.seq, &removal.hash, now, removal.count)?;
    let Some(deleted) = add_checkpoint(store, leadership, &signed).await? else {
        return Ok(0);
    };
    store
        .audit(AuditRecord {
            actor: "system",
            action: "audit.retention",
            target: None,
            result: "success",
            detail: Some(format!(
                "removed {deleted} exported records through seq {}",
                removal.seq
            )),
        })
        .await;
    Ok(deleted)
}

/// A signed checkpoint of the chain's head when it moved since the last one, so a tail cut
/// or rewritten before it shows in `flotilla audit verify` while the checkpoint stays. It is
/// signed only after the records since the newest checkpoint (whose signature is checked
/// too) were verified to chain into the head: the server never vouches for a chain it has
/// not checked. A break is logged, audited, and leaves the head unsigned.
async fn mark_audit_head(
    store: &Store,
    ca: &CertificateAuthority,
    leadership: &Leadership,
    now: i64,
) -> StoreResult<()> {
    let head = store.audit_head().await?;
    let newest = store.audit_checkpoints().await?.pop();
    if head.seq == 0 || newest.as_ref().is_some_and(|c| c.seq >= head.seq) {
        return Ok(());
    }
    held_since(store, ca, newest.as_ref(), &head).await?;
    let signed = checkpoint(ca, head.seq, &head.hash, now, 0)?;
    add_checkpoint(store, leadership, &signed).await?;
    Ok(())
}

/// Stores `signed` (and removes what it stands for) in a transaction fenced by the lease, as
/// the other removals are: a replica that lost it, with its own `--retain-audit`, removes
/// nothing after another took over. The rows deleted, or `None` when this server no longer
/// leads.
async fn add_checkpoint(
    store: &Store,
    leadership: &Leadership,
    signed: &Checkpoint,
) -> StoreResult<Option<u64>> {
    Ok(match leadership.sweep(store).await? {
        None => None,
        Some(Sweep::Alone(store)) => Some(store.add_audit_checkpoint(signed).await?),
        Some(Sweep::Fenced(mut tx)) => {
            let deleted = tx.add_audit_checkpoint(signed).await?;
            tx.commit().await?;
            Some(deleted)
        }
    })
}

/// Whether the chain holds from its newest checkpoint into its head (an error when not).
async fn check_chain(store: &Store, ca: &CertificateAuthority) -> StoreResult<()> {
    let head = store.audit_head().await?;
    let newest = store.audit_checkpoints().await?.pop();
    if newest.as_ref().is_some_and(|c| c.seq >= head.seq) {
        return Ok(());
    }
    held_since(store, ca, newest.as_ref(), &head).await
}

/// [`verify_since`], with a break logged, audited once and returned as an error.
async fn held_since(
    store: &Store,
    ca: &CertificateAuthority,
    newest: Option<&Checkpoint>,
    head: &AuditHead,
) -> StoreResult<()> {
    if let Err(b) = verify_since(store, ca, newest, head).await? {
        tracing::error!(%b, "the audit chain does not hold: nothing of it is signed or removed");
        let detail = b.to_string();
        // Once per break, not once per run.
        let said = store.newest_chained_detail("audit.chain_broken").await?;
        if said.as_deref() != Some(&detail) {
            store
                .audit(AuditRecord {
                    actor: "system",
                    action: "audit.chain_broken",
                    target: None,
                    result: "failure",
                    detail: Some(detail),
                })
                .await;
        }
        return Err(StoreError::Refused(
            format!("the audit chain does not hold: {b}").into(),
        ));
    }
    Ok(())
}

/// Checks the records after `from` (a checkpoint this CA signed, or the start of the log)
/// up to `head`, page by page.
async fn verify_since(
    store: &Store,
    ca: &CertificateAuthority,
    from: Option<&Checkpoint>,
    head: &AuditHead,
) -> StoreResult<Result<(), Break>> {
    let mut verifier = match from {
        None => Verifier::continuing(0, flotilla_audit::GENESIS),
        Some(c) => {
            let Some(hash) = flotilla_audit::from_hex(&c.hash) else {
                return Ok(Err(Break::Checkpoint {
                    seq: c.seq,
                    why: "its hash is not 64 hex digits",
                }));
            };
            let check = flotilla_pki::certificate_public_key_der(ca.certificate_pem())
                .and_then(|spki| flotilla_audit::p256_signature_check(&spki).ok());
            let statement = Checkpoint::statement(c.seq, &hash, c.at, c.removed);
            let signed = check
                .zip(hex::decode(&c.signature).ok())
                .is_some_and(|(check, sig)| check(&statement, &sig));
            if !signed {
                return Ok(Err(Break::Checkpoint {
                    seq: c.seq,
                    why: "its signature does not verify with the CA key",
                }));
            }
            Verifier::continuing(c.seq, hash)
        }
    };
    let mut after = from.map_or(0, |c| c.seq);
    while after < head.seq {
        let page = store.audit_chain(after, AUDIT_PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in page.iter().filter(|r| r.seq <= head.seq) {
            if let Err(b) = verifier.push_record(r) {
                return Ok(Err(b));
            }
        }
    }
    Ok(match verifier.finish() {
        Ok(s) if s.last_seq == head.seq && s.head == head.hash => Ok(()),
        Ok(s) => Err(Break::Truncated {
            last: s.last_seq,
            checkpoint: head.seq,
        }),
        Err(b) => Err(b),
    })
}
