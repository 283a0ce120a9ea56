//! Retention: the leader removes, every `--retention-interval`, what the configured ages say
//! is old (telemetry by age and per-device count, OTA events, finished commands, spent tokens,
//! dead letters, exported audit records), in batches with a pause between them so ingest gets
//! the write lock, and marks the audit chain's head with a signed checkpoint. Ages compare
//! with stored wall-clock timestamps; the interval runs on the monotonic clock.

use std::sync::Arc;
use std::time::Duration;

use flotilla_audit::{Checkpoint, Hash};
use flotilla_pki::CertificateAuthority;
use flotilla_store::{AuditRecord, RetentionKind, Store, StoreError, StoreResult};

use crate::config::RetentionConfig;
use crate::leader::Leadership;

/// Between two batches, so a writer waiting for the lock gets it.
const PAUSE: Duration = Duration::from_millis(10);
/// Devices read per page while capping readings per device.
const DEVICE_PAGE: i64 = 500;

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

/// One run at wall-clock `now`: what it removed, per kind (`telemetryPerDevice` and `audit`
/// beside the [`RetentionKind`]s). Stops early when this server stops leading.
pub async fn run_once(
    store: &Store,
    ca: &CertificateAuthority,
    config: &RetentionConfig,
    leadership: &Leadership,
    now: i64,
) -> StoreResult<Vec<(&'static str, u64)>> {
    let mut removed = Vec::new();
    for kind in RetentionKind::ALL {
        let Some(age) = config.age_of(kind) else {
            continue;
        };
        let cutoff = before(now, age);
        let n = drain(
            store,
            leadership,
            config.batch,
            Batch::Expired(kind, cutoff),
        )
        .await?;
        removed.push((kind.as_str(), n));
    }
    if config.telemetry_per_device > 0 {
        let n = cap_readings_per_device(store, config, leadership).await?;
        removed.push(("telemetryPerDevice", n));
    }
    if let Some(age) = config.audit.0 {
        let n = remove_exported_audit(store, ca, before(now, age), now).await?;
        removed.push(("audit", n));
    }
    for (kind, n) in &removed {
        store.record_retention_run(kind, now, *n).await?;
    }
    mark_audit_head(store, ca, now).await?;
    Ok(removed)
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
    while leadership.is_leader() {
        let n = match batch {
            Batch::Expired(kind, cutoff) => store.delete_expired(kind, cutoff, size).await?,
            Batch::Trim(device, keep) => store.trim_device_telemetry(device, keep, size).await?,
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
    cutoff: i64,
    now: i64,
) -> StoreResult<u64> {
    let Some(removal) = store.audit_removal(cutoff).await? else {
        return Ok(0);
    };
    let deleted = store
        .add_audit_checkpoint(&checkpoint(
            ca,
            removal.seq,
            &removal.hash,
            now,
            removal.count,
        )?)
        .await?;
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
/// or rewritten before it shows in `flotilla audit verify`.
async fn mark_audit_head(store: &Store, ca: &CertificateAuthority, now: i64) -> StoreResult<()> {
    let head = store.audit_head().await?;
    let newest = store.newest_audit_checkpoint_seq().await?;
    if head.seq == 0 || newest.is_some_and(|seq| seq >= head.seq) {
        return Ok(());
    }
    store
        .add_audit_checkpoint(&checkpoint(ca, head.seq, &head.hash, now, 0)?)
        .await?;
    Ok(())
}
