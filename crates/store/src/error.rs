//! Why a store call failed, in the terms its callers act on: the API answers 404, 409, 503 or
//! 500, and ingest waits (unavailable) or dead-letters the message (anything else). No sqlx
//! type shows here.

/// What went wrong underneath — the database's own error, or the store's account of a value
/// it refused — kept to be shown in the log; callers cannot look inside it.
pub struct Cause(Box<dyn std::error::Error + Send + Sync + 'static>);

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Debug for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {}

impl From<String> for Cause {
    fn from(e: String) -> Self {
        Cause(e.into())
    }
}

impl From<sqlx::Error> for Cause {
    fn from(e: sqlx::Error) -> Self {
        Cause(Box::new(e))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row a call acts on is not there (calls that look a row up return `Option`
    /// instead). A statement that unexpectedly returns no row is `Refused`, not this.
    #[error("not found")]
    NotFound,
    /// A row with the same key is there already.
    #[error("conflict: {0}")]
    Conflict(Cause),
    /// The database cannot do it now — busy or locked past its timeout, unreachable, full,
    /// shutting down, read-only during a failover — and waiting may cure it.
    #[error("database unavailable: {0}")]
    Unavailable(Cause),
    /// Anything else: the database refused the statement or its content (a constraint, a
    /// trigger), a statement returned no row where one was certain, or the database holds a
    /// value this code cannot read (an unknown state name).
    #[error("database refused: {0}")]
    Refused(Cause),
}

pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    /// Whether waiting may cure it.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e
            && db.is_unique_violation()
        {
            return StoreError::Conflict(e.into());
        }
        if is_unavailable(&e) {
            return StoreError::Unavailable(e.into());
        }
        StoreError::Refused(e.into())
    }
}

/// Whether an error is about the database's state rather than the statement: waiting may cure
/// it.
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                // SQLSTATE: 08 connection, 28 authorisation (a rotated password), 40 rolled
                // back (serialization failure, deadlock), 53 insufficient resources (disk
                // full, out of memory), 57P* shutting down or starting, 58 system error;
                // 25006 read-only (a standby during failover), 55P03 lock not available,
                // 57014 a statement cancelled (by an operator; the server sets no statement
                // timeout, so no batch is cancelled the same way each time).
                matches!(code.get(..2), Some("08" | "28" | "40" | "53" | "57" | "58"))
                    || matches!(code.as_ref(), "25006" | "55P03")
            } else {
                // SQLite primary result codes (extended codes carry them in the low byte):
                // BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL.
                code.parse::<i32>()
                    .is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 7 | 8 | 10 | 13 | 14 | 15))
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_errors_become_what_callers_act_on() {
        // A statement that returned no row where one was certain is a fault, not a 404.
        assert!(matches!(
            StoreError::from(sqlx::Error::RowNotFound),
            StoreError::Refused(_)
        ));
        assert!(StoreError::from(sqlx::Error::PoolTimedOut).is_unavailable());
        assert!(
            StoreError::from(sqlx::Error::Io(std::io::ErrorKind::BrokenPipe.into()))
                .is_unavailable()
        );
        assert!(matches!(
            StoreError::from(sqlx::Error::ColumnNotFound("x".into())),
            StoreError::Refused(_)
        ));
    }
}
