//! Releases: a signed manifest, then its image. A release is offered only once its image is
//! stored and matches the manifest (`ready`), and never while blocked.

use flotilla_proto::FirmwareVersion;
use serde::Serialize;
use sqlx::Row;

use super::{Store, StoreResult, now_ms};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRow {
    pub version: String,
    pub hardware: String,
    pub size: i64,
    pub sha256: String,
    pub security_counter: i64,
    /// The exact signed manifest text and its signature, forwarded to devices unchanged.
    pub manifest: String,
    pub signature: String,
    /// The image is stored and matches the manifest.
    pub ready: bool,
    pub blocked: bool,
    pub blocked_reason: Option<String>,
    pub created_at: i64,
}

fn release_from(r: &sqlx::any::AnyRow) -> StoreResult<ReleaseRow> {
    Ok(ReleaseRow {
        version: r.try_get("version")?,
        hardware: r.try_get("hardware")?,
        size: r.try_get("size")?,
        sha256: r.try_get("sha256")?,
        security_counter: r.try_get("security_counter")?,
        manifest: r.try_get("manifest")?,
        signature: r.try_get("signature")?,
        ready: r.try_get::<i64, _>("ready")? != 0,
        blocked: r.try_get::<i64, _>("blocked")? != 0,
        blocked_reason: r.try_get("blocked_reason")?,
        created_at: r.try_get("created_at")?,
    })
}

/// What publishing stores about a release (from its verified manifest).
#[derive(Debug, Clone)]
pub struct NewRelease<'a> {
    pub version: &'a str,
    pub hardware: &'a str,
    pub size: u64,
    pub sha256: &'a str,
    pub security_counter: u32,
    pub manifest: &'a str,
    pub signature: &'a str,
    pub created_by: i64,
}

impl Store {
    /// Stores a release awaiting its image. Conflict if the version exists.
    pub async fn create_release(&self, r: NewRelease<'_>) -> StoreResult<ReleaseRow> {
        let row = sqlx::query(
            "INSERT INTO releases (version, hardware, size, sha256, security_counter, manifest, signature, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *",
        )
        .bind(r.version)
        .bind(r.hardware)
        .bind(r.size as i64)
        .bind(r.sha256)
        .bind(i64::from(r.security_counter))
        .bind(r.manifest)
        .bind(r.signature)
        .bind(r.created_by)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        release_from(&row)
    }

    pub async fn mark_release_ready(&self, version: &str) -> StoreResult<()> {
        sqlx::query("UPDATE releases SET ready = 1 WHERE version = $1")
            .bind(version)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn release(&self, version: &str) -> StoreResult<Option<ReleaseRow>> {
        sqlx::query("SELECT * FROM releases WHERE version = $1")
            .bind(version)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(release_from)
            .transpose()
    }

    /// Every release, newest version first.
    pub async fn releases(&self) -> StoreResult<Vec<ReleaseRow>> {
        let rows = sqlx::query("SELECT * FROM releases")
            .fetch_all(&self.pool)
            .await?;
        let mut releases = rows
            .iter()
            .map(release_from)
            .collect::<StoreResult<Vec<_>>>()?;
        releases.sort_by_key(|r| std::cmp::Reverse(r.version.parse::<FirmwareVersion>().ok()));
        Ok(releases)
    }

    /// The newest release that may be offered to `hardware` (any, when unknown).
    pub async fn latest_release(&self, hardware: Option<&str>) -> StoreResult<Option<ReleaseRow>> {
        Ok(self
            .releases()
            .await?
            .into_iter()
            .find(|r| r.ready && !r.blocked && hardware.is_none_or(|h| h == r.hardware)))
    }

    /// Blocks or unblocks a release; false if there is no such release.
    pub async fn set_release_blocked(
        &self,
        version: &str,
        blocked: bool,
        reason: Option<&str>,
    ) -> StoreResult<bool> {
        let done =
            sqlx::query("UPDATE releases SET blocked = $1, blocked_reason = $2 WHERE version = $3")
                .bind(i64::from(blocked))
                .bind(if blocked { reason } else { None })
                .bind(version)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }
}
