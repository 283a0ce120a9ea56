//! Parameter markers for statements built at run time (multi-row inserts, `IN` lists).
//!
//! Fixed statements use `$1, $2, ...`, which both engines take. A built statement with
//! thousands of parameters must not: for each numbered parameter sqlx's SQLite driver asks
//! SQLite for its name, a linear scan there, so a 7,000-parameter batch spent more time binding
//! than storing (a profile showed `sqlite3_bind_parameter_name` at 26% of the database thread
//! and ingest at half the rate). SQLite gets anonymous `?` markers, bound in order.

/// Rows (or ids) per built statement: at most 7 parameters a row, far below SQLite's 32,766
/// and PostgreSQL's 65,535 parameters per statement.
pub(super) const ROWS_PER_STATEMENT: usize = 1000;

/// Hands out markers in bind order for one statement.
pub(super) struct Params {
    numbered: bool,
    next: usize,
}

impl Params {
    /// Markers for a statement run on `conn`'s engine.
    pub fn for_connection(conn: &sqlx::AnyConnection) -> Params {
        Params {
            numbered: conn.backend_name() != <sqlx::Sqlite as sqlx::Database>::NAME,
            next: 1,
        }
    }

    /// `count` markers separated by commas: "?, ?, ?" or "$4, $5, $6".
    pub fn list(&mut self, count: usize) -> String {
        (0..count)
            .map(|_| self.one())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `rows` parenthesised groups of `columns` markers, for `VALUES`.
    pub fn rows(&mut self, rows: usize, columns: usize) -> String {
        (0..rows)
            .map(|_| format!("({})", self.list(columns)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn one(&mut self) -> String {
        if self.numbered {
            let n = self.next;
            self.next += 1;
            format!("${n}")
        } else {
            "?".to_string()
        }
    }
}
