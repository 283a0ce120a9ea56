//! Why a store call failed, in the terms its callers act on: the API answers 404, 409 or 503,
//! and ingest waits (unavailable) or dead-letters (refused). No sqlx type shows here.

/// The database's own error, kept for the log.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A row the call needed is not there.
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
    /// trigger), or holds a value this code cannot read (an unknown state name).
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
        if matches!(e, sqlx::Error::RowNotFound) {
            return StoreError::NotFound;
        }
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
