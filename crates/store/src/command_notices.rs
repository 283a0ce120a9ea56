//! Notices of command state changes from every replica: on PostgreSQL a trigger sends the
//! command's id on the `flotilla_commands` channel when a change commits (migration 0014),
//! and a listener of its own connection receives them. A notice sent while the listener was
//! reconnecting is lost, so whoever waits on one also re-reads the row now and then.

use sqlx::postgres::PgListener;

use super::{Store, StoreResult};

const CHANNEL: &str = "flotilla_commands";

/// A listener for command state changes.
pub struct CommandNotices(PgListener);

impl std::fmt::Debug for CommandNotices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommandNotices")
    }
}

impl Store {
    /// Listens for command state changes; `None` on SQLite, where one process writes and
    /// knows what it changed.
    pub async fn command_notices(&self) -> StoreResult<Option<CommandNotices>> {
        let Some(url) = &self.notices else {
            return Ok(None);
        };
        let mut listener = PgListener::connect(url).await?;
        listener.listen(CHANNEL).await?;
        Ok(Some(CommandNotices(listener)))
    }
}

impl CommandNotices {
    /// The id of the next command whose state changed. After a lost connection the listener
    /// reconnects and listens again by itself; what was sent meanwhile is not seen.
    pub async fn next(&mut self) -> StoreResult<String> {
        Ok(self.0.recv().await?.payload().to_string())
    }
}
