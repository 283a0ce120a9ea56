use serde::Serialize;
use sqlx::Row;

use super::{Store, now_ms};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Operator,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

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

fn user_from(row: &sqlx::sqlite::SqliteRow) -> sqlx::Result<UserRow> {
    let role: String = row.try_get("role")?;
    Ok(UserRow {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        email: row.try_get("email")?,
        password_hash: row.try_get("password_hash")?,
        role: Role::parse(&role).unwrap_or(Role::Viewer),
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
    ) -> sqlx::Result<i64> {
        let r = sqlx::query("INSERT INTO users (username, email, password_hash, role, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(username)
            .bind(email)
            .bind(password_hash)
            .bind(role.as_str())
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(r.last_insert_rowid())
    }

    pub async fn user_by_email(&self, email: &str) -> sqlx::Result<Option<UserRow>> {
        let row = sqlx::query("SELECT * FROM users WHERE email = ?")
            .bind(email)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from).transpose()
    }

    pub async fn user_by_id(&self, id: i64) -> sqlx::Result<Option<UserRow>> {
        let row = sqlx::query("SELECT * FROM users WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from).transpose()
    }

    pub async fn users(&self) -> sqlx::Result<Vec<UserRow>> {
        let rows = sqlx::query("SELECT * FROM users ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(user_from).collect()
    }

    /// Flips the blocked flag; returns the new value, or None if there is no such user.
    /// Blocks or unblocks a user; never blocks the last active admin. Ok(blocked-now).
    pub async fn toggle_user_block(&self, id: i64) -> sqlx::Result<UserChange<bool>> {
        // One statement, so two admins blocking each other at once cannot both succeed.
        let blocked: Option<i64> = sqlx::query_scalar(
            "UPDATE users SET blocked = 1 - blocked WHERE id = ? AND (blocked = 1 OR role != 'admin' \
             OR (SELECT COUNT(*) FROM users WHERE role = 'admin' AND blocked = 0 AND id != ?) > 0) \
             RETURNING blocked",
        )
        .bind(id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match blocked {
            Some(b) => Ok(UserChange::Done(b != 0)),
            None => self.why_unchanged(id).await,
        }
    }

    /// Changes a user's role; never demotes the last active admin.
    pub async fn set_user_role(&self, id: i64, role: Role) -> sqlx::Result<UserChange<()>> {
        let r = sqlx::query(
            "UPDATE users SET role = ? WHERE id = ? AND (? = 'admin' OR role != 'admin' OR blocked = 1 \
             OR (SELECT COUNT(*) FROM users WHERE role = 'admin' AND blocked = 0 AND id != ?) > 0)",
        )
        .bind(role.as_str())
        .bind(id)
        .bind(role.as_str())
        .bind(id)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 1 {
            Ok(UserChange::Done(()))
        } else {
            self.why_unchanged(id).await
        }
    }

    async fn why_unchanged<T>(&self, id: i64) -> sqlx::Result<UserChange<T>> {
        let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM users WHERE id = ?")
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

/// The outcome of a change to a user that must keep one active admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserChange<T> {
    Done(T),
    NotFound,
    /// Refused: the user is the last admin who is not blocked.
    LastAdmin,
}
