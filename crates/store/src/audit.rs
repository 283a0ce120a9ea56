use flotilla_audit::{ChainedRecord, Checkpoint, Fields, Hash, from_hex, record_hash, to_hex};
use serde::Serialize;
use sqlx::{Any, Row, Transaction};

use super::{Store, StoreError, StoreResult, now_ms};

/// A security-relevant event to record: who did what to what, and how it ended.
#[derive(Debug, Clone)]
pub struct AuditRecord<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub target: Option<&'a str>,
    pub result: &'a str,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub result: String,
    pub detail: Option<String>,
}

const INSERT: &str = "INSERT INTO audit (at, actor, action, target, result, detail, seq, prev_hash, hash) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// The next link of the chain: takes the head's row lock (SQLite's write lock) until `tx` ends,
/// so records are chained in the order they commit, and returns (seq, previous hash).
async fn next_link(tx: &mut Transaction<'_, Any>) -> StoreResult<(u64, Hash)> {
    let (seq, prev): (i64, String) =
        sqlx::query_as("UPDATE audit_chain SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash")
            .fetch_one(&mut **tx)
            .await?;
    let prev = from_hex(&prev).ok_or_else(|| corrupt("the audit chain head's hash"))?;
    Ok((seq as u64, prev))
}

async fn set_head(tx: &mut Transaction<'_, Any>, hash: &Hash) -> StoreResult<()> {
    sqlx::query("UPDATE audit_chain SET hash = $1 WHERE id = 1")
        .bind(to_hex(hash))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Refused(format!("{what} is not a 64-digit hex hash").into())
}

/// Records `rec` in `tx`, chained to the record before it: it stands or falls with the change
/// it describes.
pub(super) async fn audit_in(
    tx: &mut Transaction<'_, Any>,
    rec: &AuditRecord<'_>,
) -> StoreResult<()> {
    let at = now_ms();
    let (seq, prev) = next_link(tx).await?;
    let hash = record_hash(
        &Fields {
            seq,
            at,
            actor: rec.actor,
            action: rec.action,
            target: rec.target,
            result: rec.result,
            detail: rec.detail.as_deref(),
        },
        &prev,
    );
    sqlx::query(INSERT)
        .bind(at)
        .bind(rec.actor)
        .bind(rec.action)
        .bind(rec.target)
        .bind(rec.result)
        .bind(rec.detail.as_deref())
        .bind(seq as i64)
        .bind(to_hex(&prev))
        .bind(to_hex(&hash))
        .execute(&mut **tx)
        .await?;
    set_head(tx, &hash).await
}

/// Chains the rows written before the chain existed (no seq), in id order, once: while the
/// chain has never been appended to. Run at open. A row without a seq written after the chain
/// began did not come through this code: it is left out of the chain and reported loudly,
/// never laundered into it.
pub(super) async fn seal_unchained(store: &Store) -> StoreResult<u64> {
    let mut tx = store.begin_immediate().await?;
    // The head's row lock first, so replicas opening together seal one after the other.
    let (head,): (i64,) =
        sqlx::query_as("UPDATE audit_chain SET seq = seq WHERE id = 1 RETURNING seq")
            .fetch_one(&mut *tx)
            .await?;
    let rows = if head == 0 {
        sqlx::query(
            "SELECT id, at, actor, action, target, result, detail FROM audit WHERE seq IS NULL \
             ORDER BY id",
        )
        .fetch_all(&mut *tx)
        .await?
    } else {
        Vec::new()
    };
    for row in &rows {
        let (seq, prev) = next_link(&mut tx).await?;
        let (actor, action, result): (String, String, String) = (
            row.try_get("actor")?,
            row.try_get("action")?,
            row.try_get("result")?,
        );
        let (target, detail): (Option<String>, Option<String>) =
            (row.try_get("target")?, row.try_get("detail")?);
        let hash = record_hash(
            &Fields {
                seq,
                at: row.try_get("at")?,
                actor: &actor,
                action: &action,
                target: target.as_deref(),
                result: &result,
                detail: detail.as_deref(),
            },
            &prev,
        );
        sqlx::query(
            "UPDATE audit SET seq = $1, prev_hash = $2, hash = $3 WHERE id = $4 AND seq IS NULL",
        )
        .bind(seq as i64)
        .bind(to_hex(&prev))
        .bind(to_hex(&hash))
        .bind(row.try_get::<i64, _>("id")?)
        .execute(&mut *tx)
        .await?;
        set_head(&mut tx, &hash).await?;
    }
    let (stray,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM audit WHERE seq IS NULL")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    if stray > 0 {
        tracing::error!(
            rows = stray,
            "audit rows without a place in the chain were written after it began: someone wrote the table directly"
        );
    }
    Ok(rows.len() as u64)
}

/// The chain's head and how far an operator has exported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHead {
    /// 0 while the log is empty.
    pub seq: u64,
    pub hash: Hash,
    pub exported_through: u64,
}

/// The records retention may remove: those up to `seq`, the last exported record older than
/// the cutoff; `hash` is that record's, for the checkpoint that stands in for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRemoval {
    pub seq: u64,
    pub hash: Hash,
    pub count: u64,
}

impl Store {
    pub async fn audit(&self, rec: AuditRecord<'_>) {
        let r = async {
            let mut tx = self.begin_immediate().await?;
            audit_in(&mut tx, &rec).await?;
            tx.commit().await?;
            StoreResult::Ok(())
        }
        .await;
        if let Err(e) = r {
            // Losing an audit line must be loud: it is the record of who did what.
            tracing::error!(error = %e, action = rec.action, actor = rec.actor, "failed to write audit record");
        }
    }

    pub async fn audit_entries(
        &self,
        limit: i64,
        action: Option<&str>,
    ) -> StoreResult<Vec<AuditEntry>> {
        // Two statements, so the one with an action can use the (action, id) index.
        let rows = match action {
            Some(action) => {
                sqlx::query(AUDIT_BY_ACTION)
                    .bind(action)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM audit ORDER BY id DESC LIMIT $1")
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    result: r.try_get("result")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    /// Up to `limit` chained records after `after_seq`, oldest first.
    pub async fn audit_chain(&self, after_seq: u64, limit: i64) -> StoreResult<Vec<ChainedRecord>> {
        let rows = sqlx::query(
            "SELECT id, seq, at, actor, action, target, result, detail, prev_hash, hash FROM audit \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq as i64)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        // Whatever a writer of the table left in a row is handed to the verifier to judge
        // (a NULL becomes a value that cannot hash as the record did), never an error here.
        let text = |r: &sqlx::any::AnyRow, column: &str| -> StoreResult<String> {
            Ok(r.try_get::<Option<String>, _>(column)?.unwrap_or_default())
        };
        rows.iter()
            .map(|r| {
                Ok(ChainedRecord {
                    seq: r.try_get::<i64, _>("seq")? as u64,
                    id: r.try_get("id")?,
                    at: r.try_get::<Option<i64>, _>("at")?.unwrap_or(i64::MIN),
                    actor: text(r, "actor")?,
                    action: text(r, "action")?,
                    target: r.try_get("target")?,
                    result: text(r, "result")?,
                    detail: r.try_get("detail")?,
                    prev_hash: text(r, "prev_hash")?,
                    hash: text(r, "hash")?,
                })
            })
            .collect()
    }

    /// The detail of the newest record of `action` in the chain (rows outside it are not
    /// looked at: anyone who can write the table could have put them there).
    pub async fn newest_chained_detail(&self, action: &str) -> StoreResult<Option<String>> {
        let detail: Option<(Option<String>,)> = sqlx::query_as(
            "SELECT detail FROM audit WHERE action = $1 AND seq IS NOT NULL \
             ORDER BY seq DESC LIMIT 1",
        )
        .bind(action)
        .fetch_optional(&self.pool)
        .await?;
        Ok(detail.and_then(|(d,)| d))
    }

    pub async fn audit_checkpoints(&self) -> StoreResult<Vec<Checkpoint>> {
        let rows: Vec<(i64, String, i64, i64, String)> = sqlx::query_as(
            "SELECT seq, hash, at, removed, signature FROM audit_checkpoints ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, hash, at, removed, signature)| Checkpoint {
                seq: seq as u64,
                hash,
                at,
                removed: removed as u64,
                signature,
            })
            .collect())
    }

    pub async fn audit_head(&self) -> StoreResult<AuditHead> {
        let (seq, hash, exported_through): (i64, String, i64) =
            sqlx::query_as("SELECT seq, hash, exported_through FROM audit_chain WHERE id = 1")
                .fetch_one(&self.pool)
                .await?;
        Ok(AuditHead {
            seq: seq as u64,
            hash: from_hex(&hash).ok_or_else(|| corrupt("the audit chain head's hash"))?,
            exported_through: exported_through as u64,
        })
    }

    /// Records that an operator holds a copy of the log from after `after` through `through`
    /// (the mark never passes the head nor goes back); returns the mark now in force. A copy
    /// that starts past the mark would leave a gap nobody holds: that is a conflict.
    pub async fn mark_audit_exported(&self, after: u64, through: u64) -> StoreResult<u64> {
        let through = i64::try_from(through).unwrap_or(i64::MAX);
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let mark: Option<(i64,)> = sqlx::query_as(
            "UPDATE audit_chain SET exported_through = CASE \
               WHEN $1 > seq THEN seq WHEN $1 > exported_through THEN $1 ELSE exported_through END \
             WHERE id = 1 AND $2 <= exported_through RETURNING exported_through",
        )
        .bind(through)
        .bind(after)
        .fetch_optional(&self.pool)
        .await?;
        match mark {
            Some((mark,)) => Ok(mark as u64),
            None => Err(StoreError::Conflict(
                "the copy starts after the records exported so far: export from the mark"
                    .to_string()
                    .into(),
            )),
        }
    }

    /// What retention may remove of the log: exported records, through the last one written
    /// before `before_ms`. `None` when there is nothing.
    pub async fn audit_removal(&self, before_ms: i64) -> StoreResult<Option<AuditRemoval>> {
        let mut tx = self.begin_read().await?;
        let last: Option<(i64, String)> = sqlx::query_as(
            "SELECT seq, hash FROM audit WHERE seq = (SELECT MAX(seq) FROM audit \
               WHERE at < $1 AND seq <= (SELECT exported_through FROM audit_chain WHERE id = 1))",
        )
        .bind(before_ms)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((seq, hash)) = last else {
            return Ok(None);
        };
        let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM audit WHERE seq <= $1")
            .bind(seq)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(AuditRemoval {
            seq: seq as u64,
            hash: from_hex(&hash).ok_or_else(|| corrupt("an audit record's hash"))?,
            count: count as u64,
        }))
    }

    /// Stores a signed checkpoint and, when it stands for removed records (`removed > 0`),
    /// deletes the records through its seq; either way the head checkpoints it supersedes go,
    /// in the same transaction. Returns the rows deleted.
    pub async fn add_audit_checkpoint(&self, checkpoint: &Checkpoint) -> StoreResult<u64> {
        let mut tx = self.begin_immediate().await?;
        let deleted = add_audit_checkpoint_in(&mut tx, checkpoint).await?;
        tx.commit().await?;
        Ok(deleted)
    }
}

/// [`Store::add_audit_checkpoint`] inside `tx` (the leader's fenced transaction, in scale mode).
pub(super) async fn add_audit_checkpoint_in(
    tx: &mut Transaction<'_, Any>,
    checkpoint: &Checkpoint,
) -> StoreResult<u64> {
    if checkpoint.removed > 0 {
        // Heads marked at or before it vouch for nothing that will still be there; a head
        // at its very seq must give way before the insert, or the removal would not be
        // stored and the log would start after nothing signed.
        sqlx::query("DELETE FROM audit_checkpoints WHERE removed = 0 AND seq <= $1")
            .bind(checkpoint.seq as i64)
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query(
        "INSERT INTO audit_checkpoints (seq, hash, at, removed, signature) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
    )
    .bind(checkpoint.seq as i64)
    .bind(&checkpoint.hash)
    .bind(checkpoint.at)
    .bind(checkpoint.removed as i64)
    .bind(&checkpoint.signature)
    .execute(&mut **tx)
    .await?;
    if checkpoint.removed == 0 {
        // The newest head vouches for every record before it (their hashes chain into
        // it), so older heads say nothing more.
        sqlx::query("DELETE FROM audit_checkpoints WHERE removed = 0 AND seq < $1")
            .bind(checkpoint.seq as i64)
            .execute(&mut **tx)
            .await?;
    }
    let deleted = if checkpoint.removed > 0 {
        sqlx::query("DELETE FROM audit WHERE seq <= $1")
            .bind(checkpoint.seq as i64)
            .execute(&mut **tx)
            .await?
            .rows_affected()
    } else {
        0
    };
    Ok(deleted)
}

/// The newest audit rows of one action.
pub(super) const AUDIT_BY_ACTION: &str =
    "SELECT * FROM audit WHERE action = $1 ORDER BY id DESC LIMIT $2";
