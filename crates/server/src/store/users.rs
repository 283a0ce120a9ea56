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
    pub async fn toggle_user_block(&self, id: i64) -> sqlx::Result<Option<bool>> {
        sqlx::query_scalar("UPDATE users SET blocked = 1 - blocked WHERE id = ? RETURNING blocked")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map(|v: Option<i64>| v.map(|b| b != 0))
    }

    pub async fn set_user_role(&self, id: i64, role: Role) -> sqlx::Result<bool> {
        let r = sqlx::query("UPDATE users SET role = ? WHERE id = ?")
            .bind(role.as_str())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }
}
