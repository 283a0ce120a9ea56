//! Attempts counted in fixed windows under a key, in the database, so every replica on it
//! sees the same counts. A window starts at its key's first attempt and a new one starts at
//! the first attempt after it ended.

use super::{Store, StoreResult, now_ms};

impl Store {
    /// Counts one attempt under each of `keys` and returns, for each, how many its window held
    /// before this one.
    pub async fn count_attempts(&self, keys: &[&str], window_ms: i64) -> StoreResult<Vec<i64>> {
        let now = now_ms();
        let mut before = Vec::with_capacity(keys.len());
        for key in keys {
            let attempts: i64 = sqlx::query_scalar(
                "INSERT INTO attempt_counts (key, window_start, attempts) VALUES ($1, $2, 1) \
                 ON CONFLICT (key) DO UPDATE SET \
                 attempts = CASE WHEN attempt_counts.window_start <= $3 THEN 1 \
                     ELSE attempt_counts.attempts + 1 END, \
                 window_start = CASE WHEN attempt_counts.window_start <= $4 THEN $5 \
                     ELSE attempt_counts.window_start END \
                 RETURNING attempts",
            )
            .bind(*key)
            .bind(now)
            .bind(now - window_ms)
            .bind(now - window_ms)
            .bind(now)
            .fetch_one(&self.pool)
            .await?;
            before.push(attempts - 1);
        }
        Ok(before)
    }

    /// Takes one attempt back from `key` (one that turned out not to count).
    pub async fn give_back_attempt(&self, key: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE attempt_counts SET attempts = attempts - 1 WHERE key = $1 AND attempts > 0",
        )
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets `key`'s attempts.
    pub async fn clear_attempts(&self, key: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM attempt_counts WHERE key = $1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Removes windows that ended before `window_ms` ago; how many.
    pub async fn prune_attempts(&self, window_ms: i64) -> StoreResult<u64> {
        let r = sqlx::query("DELETE FROM attempt_counts WHERE window_start <= $1")
            .bind(now_ms() - window_ms)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
