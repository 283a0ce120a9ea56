use serde::Serialize;
use sqlx::Row;

use super::{Role, Store, StoreResult, now_ms};

#[derive(Debug, Clone, Serialize)]
pub struct UserRow {
    pub id: i64,
    pub username: String,
    pub email: String,
    #[serde(skip)]
    pub password_hash: String,
    pub role: Role,
    pub blocked: bool,
    #[serde(rename = "createdAt")]
    pub created_at: i64,
}

fn user_from(row: &sqlx::any::AnyRow) -> StoreResult<UserRow> {
    Ok(UserRow {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        email: row.try_get("email")?,
        password_hash: row.try_get("password_hash")?,
        role: super::states::state(row, "role")?,
        blocked: row.try_get::<i64, _>("blocked")? != 0,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    pub async fn create_user(
        &self,
        username: &str,
        email: &str,
        password_hash: &str,
        role: Role,
    ) -> StoreResult<i64> {
        Ok(sqlx::query_scalar("INSERT INTO users (username, email, password_hash, role, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id")
            .bind(username)
            .bind(email)
            .bind(password_hash)
            .bind(role.as_str())
            .bind(now_ms())
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn user_by_email(&self, email: &str) -> StoreResult<Option<UserRow>> {
        let row = sqlx::query("SELECT * FROM users WHERE email = $1")
            .bind(email)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from).transpose()
    }

    pub async fn user_by_id(&self, id: i64) -> StoreResult<Option<UserRow>> {
        let row = sqlx::query("SELECT * FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from).transpose()
    }

    pub async fn users(&self) -> StoreResult<Vec<UserRow>> {
        let rows = sqlx::query("SELECT * FROM users ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(user_from).collect()
    }

    /// Blocks or unblocks a user; never blocks the last active admin. Ok(blocked-now).
    pub async fn toggle_user_block(&self, id: i64) -> StoreResult<UserChange<bool>> {
        // One statement (under the admins lock on PostgreSQL), so two admins blocking each
        // other at once cannot both succeed.
        let mut tx = self.pool.begin().await?;
        self.lock_admins(&mut tx).await?;
        let blocked: Option<i64> = sqlx::query_scalar(
            "UPDATE users SET blocked = 1 - blocked WHERE id = $1 AND (blocked = 1 OR role != 'admin' \
             OR (SELECT COUNT(*) FROM users WHERE role = 'admin' AND blocked = 0 AND id != $2) > 0) \
             RETURNING blocked",
        )
        .bind(id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        match blocked {
            Some(b) => Ok(UserChange::Done(b != 0)),
            None => self.why_unchanged(id).await,
        }
    }

    /// Changes a user's role; never demotes the last active admin.
    pub async fn set_user_role(&self, id: i64, role: Role) -> StoreResult<UserChange<()>> {
        let mut tx = self.pool.begin().await?;
        self.lock_admins(&mut tx).await?;
        let r = sqlx::query(
            "UPDATE users SET role = $1 WHERE id = $2 AND ($3 = 'admin' OR role != 'admin' OR blocked = 1 \
             OR (SELECT COUNT(*) FROM users WHERE role = 'admin' AND blocked = 0 AND id != $4) > 0)",
        )
        .bind(role.as_str())
        .bind(id)
        .bind(role.as_str())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if r.rows_affected() == 1 {
            Ok(UserChange::Done(()))
        } else {
            self.why_unchanged(id).await
        }
    }

    /// Serialises changes that must keep one active admin. SQLite has one writer at a time
    /// already; on PostgreSQL two such updates would each count the other's admin as active
    /// (read committed), so they take a transaction-scoped advisory lock first.
    async fn lock_admins(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> StoreResult<()> {
        if self.backend == super::Backend::Postgres {
            sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock($1)) AS locked")
                .bind(ADMINS_LOCK)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    async fn why_unchanged<T>(&self, id: i64) -> StoreResult<UserChange<T>> {
        let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(if exists.is_some() {
            UserChange::LastAdmin
        } else {
            UserChange::NotFound
        })
    }
}

/// The advisory lock key of [`Store::lock_admins`] ("fl-admin" in ASCII).
const ADMINS_LOCK: i64 = 0x666c_2d61_646d_696e;

/// The outcome of a change to a user that must keep one active admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserChange<T> {
    Done(T),
    NotFound,
    /// Refused: the user is the last admin who is not blocked.
    LastAdmin,
}
