use serde::Serialize;
use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, Row, Transaction};

use super::{Store, StoreResult, now_ms};

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

const INSERT: &str =
    "INSERT INTO audit (at, actor, action, target, result, detail) VALUES ($1, $2, $3, $4, $5, $6)";

/// The insert of `rec`, ready to run on a pool or in a transaction.
fn insert<'q>(rec: &'q AuditRecord<'_>) -> Query<'q, Any, AnyArguments<'q>> {
    sqlx::query(INSERT)
        .bind(now_ms())
        .bind(rec.actor)
        .bind(rec.action)
        .bind(rec.target)
        .bind(rec.result)
        .bind(rec.detail.as_deref())
}

/// Records `rec` in `tx`: it stands or falls with the change it describes.
pub(super) async fn audit_in(
    tx: &mut Transaction<'_, Any>,
    rec: &AuditRecord<'_>,
) -> StoreResult<()> {
    insert(rec).execute(&mut **tx).await?;
    Ok(())
}

impl Store {
    pub async fn audit(&self, rec: AuditRecord<'_>) {
        let r = insert(&rec).execute(&self.pool).await;
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
}

/// The newest audit rows of one action.
pub(super) const AUDIT_BY_ACTION: &str =
    "SELECT * FROM audit WHERE action = $1 ORDER BY id DESC LIMIT $2";
