//! Flotilla's store: one SQLite file in the data dir (the default), or a PostgreSQL database,
//! behind one domain API. Its calls fail with a [`StoreError`] (not found, conflict,
//! unavailable, refused; the driver's error is only a cause to log), opening a database with
//! an `anyhow` error; ingest writes through a [`WriteTx`]. The `test-support` feature adds
//! throwaway databases and fault injection (sqlx types) for other crates' tests. Integer millisecond
//! timestamps; flags are integers 0/1 on both engines. docs/architecture.md ("One store, two
//! engines") gives the rules every statement here follows.

mod attempts;
mod audit;
mod certificates;
mod command_notices;
mod commands;
#[cfg(test)]
mod conformance;
mod device_config;
mod devices;
mod error;
mod ingest;
mod leases;
mod migrations;
mod ota;
mod params;
mod releases;
mod retention;
mod rollout_candidates;
mod rollouts;
mod security;
mod states;
#[cfg(any(test, feature = "test-support"))]
pub mod testdb;
mod token_keys;
mod tokens;
mod users;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor};

pub use audit::{AuditEntry, AuditHead, AuditRecord, AuditRemoval};
pub use certificates::{BrokerDenials, Promotion, RenewalRefusal, RevokedCertificate};
pub use command_notices::CommandNotices;
pub use commands::CommandRow;
pub use device_config::ConfigRow;
pub use devices::{DeviceRow, DeviceUpdate, GateEntry, TelemetryRow};
pub use error::{StoreError, StoreResult};
pub use ingest::WriteTx;
pub use leases::{FencedTx, Held};
pub use ota::{Finished, MadeOffer, NewOffer, UpdateRow, Withdrawn};
pub use releases::{NewRelease, ReleaseRow};
pub use retention::{RetentionKind, RetentionRun, StorageFigures};
pub use rollout_candidates::{Candidate, Selection, TargetSelector};
pub use rollouts::{HeartbeatRow, RolloutRow, RolloutSave, SavedOffers, TargetRow};
pub use security::{
    CrashingDevice, DeniedDevice, ExpiringCertificate, NeverSeenDevice, SecurityReport,
};
pub use states::{
    CommandState, RevokeReason, Role, RolloutHalt, RolloutState, TargetState, UpdateState,
};
pub use tokens::TokenClaim;
pub use users::{UserChange, UserRow};

/// The fleet's state as `/metrics` shows it.
#[derive(Debug, Clone, Default)]
pub struct FleetGauges {
    pub devices: i64,
    pub online: i64,
    /// (state, count) per command state present.
    pub commands: Vec<(String, i64)>,
    pub rollouts: Vec<(String, i64)>,
    /// The earliest `not after` of an unblocked device's current certificate, in Unix ms.
    pub first_cert_expiry_ms: Option<i64>,
    /// Unblocked devices holding a certificate.
    pub device_certificates: i64,
}

/// Which database engine holds the data. Statements are written once (`$N` parameters, which
/// both engines take) except where an engine needs its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Where the data lives, from `--database-url`: a SQLite file (the embedded default) or a
/// PostgreSQL database. `Debug`, `Serialize` and every error from here leave passwords out.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<DatabaseUrl, String> {
        let url = url.trim();
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err(
                    "a sqlite URL needs a file path, as in sqlite:///var/lib/flotilla/flotilla.db"
                        .into(),
                );
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            check_postgres_url(url)?;
            sqlx::postgres::PgConnectOptions::from_str(url).map_err(|e| {
                format!(
                    "not a usable PostgreSQL URL: {}",
                    redact(&e.to_string(), url)
                )
            })?;
            return Ok(DatabaseUrl::Postgres(url.to_string()));
        }
        Err("the database URL must start with sqlite:// or postgres://".into())
    }
}

impl DatabaseUrl {
    /// The URL for logs and `--print-config`: for PostgreSQL only user, host, port and
    /// database are shown, and `<redacted>` where a password was given (in the user part or
    /// as `?password=`).
    pub fn redacted(&self) -> String {
        match self {
            DatabaseUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
            DatabaseUrl::Postgres(url) => {
                let Ok(o) = sqlx::postgres::PgConnectOptions::from_str(url) else {
                    return "postgres://<unreadable>".into();
                };
                let password = if passwords(url).is_empty() {
                    ""
                } else {
                    ":<redacted>"
                };
                format!(
                    "postgres://{}{password}@{}:{}/{}",
                    o.get_username(),
                    o.get_host(),
                    o.get_port(),
                    o.get_database().unwrap_or_default()
                )
            }
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            DatabaseUrl::Sqlite(_) => Backend::Sqlite,
            DatabaseUrl::Postgres(_) => Backend::Postgres,
        }
    }
}

/// Connection parameters sqlx takes; it logs any other with its value (a misspelled
/// `passwd=` would be printed), so those are refused here, naming only the key.
const POSTGRES_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// What must hold of a PostgreSQL URL before anything parses (and might print) it: every
/// query parameter known, and no '/', '?' or '#' left unencoded in the user part, where a
/// URL parser would read part of the password as host or path.
fn check_postgres_url(url: &str) -> Result<(), String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or_default();
    if !authority.contains('@') && (before_query.contains('@') || query.contains('@')) {
        return Err(
            "percent-encode '/', '?', '#' and '@' in the user and password (%2F, %3F, %23, %40)"
                .into(),
        );
    }
    if before_query.contains('#') {
        return Err("percent-encode '#' in the user and password (%23)".into());
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if !POSTGRES_PARAMETERS.contains(&key) && !key.starts_with("options[") {
            return Err(format!(
                "unknown connection parameter {:?}; known: {}",
                flotilla_proto::truncate_chars(key, 40),
                POSTGRES_PARAMETERS.join(", ")
            ));
        }
    }
    Ok(())
}

/// The passwords a connection URL carries, as written and percent-decoded: after the user in
/// the authority, and as the `password` query parameter.
fn passwords(url: &str) -> Vec<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, q),
        None => (rest, ""),
    };
    let authority = authority.split('/').next().unwrap_or_default();
    let mut found: Vec<&str> = Vec::new();
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && let Some((_, password)) = userinfo.split_once(':')
    {
        found.push(password);
    }
    for pair in query.split('&') {
        if let Some(("password", value)) = pair.split_once('=') {
            found.push(value);
        }
    }
    let mut all = Vec::new();
    for p in found.into_iter().filter(|p| !p.is_empty()) {
        all.push(p.to_string());
        if let Ok(decoded) = percent_decode(p)
            && decoded != p
        {
            all.push(decoded);
        }
    }
    all
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or(())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// `text` with every password of `url` replaced by `<redacted>`.
fn redact(text: &str, url: &str) -> String {
    let mut secrets = passwords(url);
    // The longest first, so a password that contains another is replaced whole.
    secrets.sort_by_key(|p| std::cmp::Reverse(p.len()));
    secrets
        .iter()
        .fold(text.to_string(), |t, p| t.replace(p.as_str(), "<redacted>"))
}

/// `--database-url` as given. Parsing it is left to the server's `ServerConfig::database`, because a
/// value clap refuses is printed back whole, password included.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrlArg(String);

impl FromStr for DatabaseUrlArg {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<DatabaseUrlArg, Self::Err> {
        Ok(DatabaseUrlArg(s.to_string()))
    }
}

impl DatabaseUrlArg {
    pub fn parse(&self) -> Result<DatabaseUrl, String> {
        self.0.parse()
    }

    fn shown(&self) -> String {
        self.parse()
            .map(|u| u.redacted())
            .unwrap_or_else(|_| "<unusable; see the start-up error>".into())
    }
}

impl std::fmt::Debug for DatabaseUrlArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

impl serde::Serialize for DatabaseUrlArg {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.shown())
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl serde::Serialize for DatabaseUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Where a listener for change notices connects (PostgreSQL only).
    notices: Option<String>,
}

/// (key, value) rows as each key's values, in the order read (a listing's tags or targets,
/// read in one statement for all its rows).
fn grouped(pairs: Vec<(String, String)>) -> std::collections::HashMap<String, Vec<String>> {
    let mut by_key: std::collections::HashMap<String, Vec<String>> = Default::default();
    for (key, value) in pairs {
        by_key.entry(key).or_default().push(value);
    }
    by_key
}

/// A device id read back into a device row; one that is not valid (written by something
/// other than this code) refuses the read instead of reaching the row.
fn parse_device_id(s: &str) -> StoreResult<flotilla_proto::DeviceId> {
    flotilla_proto::DeviceId::parse(s).map_err(|e| {
        let shown = flotilla_proto::truncate_chars(s, 80);
        StoreError::Refused(format!("stored device id {shown:?}: {e}").into())
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating a SQLite file if needed) and migrates the database.
    pub async fn open(url: &DatabaseUrl) -> anyhow::Result<Store> {
        Store::open_with_busy_timeout(url, Duration::from_secs(10)).await
    }

    /// [`Store::open`] with another wait for a database another writer holds (SQLite's busy
    /// timeout; PostgreSQL's lock timeout).
    pub async fn open_with_busy_timeout(
        url: &DatabaseUrl,
        busy: Duration,
    ) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let busy_ms = busy.as_millis();
        let (connect, options) = match url {
            DatabaseUrl::Sqlite(path) => (
                format!("sqlite://{}?mode=rwc", path.display()),
                // WAL, and synchronous=FULL so a commit is on disk before anything is
                // acknowledged; the pragmas are per connection.
                AnyPoolOptions::new()
                    .max_connections(8)
                    .after_connect(move |conn, _| {
                        let pragmas = format!(
                            "PRAGMA busy_timeout = {busy_ms}; PRAGMA journal_mode = WAL; \
                         PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;"
                        );
                        Box::pin(async move {
                            conn.execute(pragmas.as_str()).await?;
                            Ok(())
                        })
                    }),
            ),
            DatabaseUrl::Postgres(url) => (
                url.clone(),
                AnyPoolOptions::new()
                    .max_connections(16)
                    .after_connect(move |conn, _| {
                        let set = format!("SET lock_timeout = {busy_ms}");
                        Box::pin(async move {
                            conn.execute(set.as_str()).await?;
                            Ok(())
                        })
                    }),
            ),
        };
        let pool = options.connect(&connect).await.map_err(|e| {
            anyhow::anyhow!(
                "opening database {}: {}",
                url.redacted(),
                redact(&e.to_string(), &connect)
            )
        })?;
        let backend = url.backend();
        migrations::run(&pool, backend)
            .await
            .context("running migrations")?;
        let notices = match url {
            DatabaseUrl::Postgres(url) => Some(url.clone()),
            DatabaseUrl::Sqlite(_) => None,
        };
        let store = Store {
            pool,
            backend,
            notices,
        };
        let sealed = audit::seal_unchained(&store)
            .await
            .context("chaining audit records written before the chain")?;
        if sealed > 0 {
            tracing::info!(
                records = sealed,
                "chained audit records written before the chain"
            );
        }
        Ok(store)
    }

    /// A SQLite file (tests).
    #[cfg(any(test, feature = "test-support"))]
    pub async fn open_file(path: &std::path::Path) -> anyhow::Result<Store> {
        Store::open(&DatabaseUrl::Sqlite(path.to_path_buf())).await
    }

    /// What `/metrics` reads from the database: one read transaction, so the figures agree.
    pub async fn fleet_gauges(&self) -> StoreResult<FleetGauges> {
        let mut tx = self.begin_read().await?;
        let (devices, online): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(online), 0) AS BIGINT) FROM devices",
        )
        .fetch_one(&mut *tx)
        .await?;
        let commands =
            sqlx::query_as("SELECT state, COUNT(*) FROM commands GROUP BY state ORDER BY state")
                .fetch_all(&mut *tx)
                .await?;
        let rollouts =
            sqlx::query_as("SELECT state, COUNT(*) FROM rollouts GROUP BY state ORDER BY state")
                .fetch_all(&mut *tx)
                .await?;
        let (first_cert_expiry_ms, device_certificates) = sqlx::query_as(
            "SELECT MIN(cert_not_after), COUNT(*) FROM devices WHERE blocked = 0 AND cert_serial IS NOT NULL",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(FleetGauges {
            devices,
            online,
            commands,
            rollouts,
            first_cert_expiry_ms,
            device_certificates,
        })
    }

    /// Fleet-wide counts for operators and benchmarks.
    pub async fn stats(&self) -> StoreResult<serde_json::Value> {
        let count = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&self.pool)
                .await
        };
        Ok(serde_json::json!({
            "users": count("SELECT COUNT(*) FROM users").await?,
            "devices": count("SELECT COUNT(*) FROM devices").await?,
            "online": count("SELECT COUNT(*) FROM devices WHERE online = 1").await?,
            "telemetryRows": count("SELECT COUNT(*) FROM telemetry").await?,
            "commands": count("SELECT COUNT(*) FROM commands").await?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_pick_a_backend_and_never_show_a_password() {
        for (url, shown) in [
            (
                "postgres://flotilla:s3cr%40t@db.internal:5432/fleet?sslmode=require",
                "postgres://flotilla:<redacted>@db.internal:5432/fleet",
            ),
            (
                "postgresql://flotilla@db/fleet?password=s3cr%40t&sslmode=require",
                "postgres://flotilla:<redacted>@db:5432/fleet",
            ),
            ("postgres://u@h/d", "postgres://u@h:5432/d"),
        ] {
            let pg: DatabaseUrl = url.parse().unwrap();
            assert_eq!(pg.backend(), Backend::Postgres);
            let printed = format!("{pg:?} {}", serde_json::to_string(&pg).unwrap());
            assert!(!printed.contains("s3cr"), "{printed}");
            assert_eq!(pg.redacted(), shown);
        }
        assert_eq!(
            "sqlite:///var/lib/flotilla/f.db".parse::<DatabaseUrl>(),
            Ok(DatabaseUrl::Sqlite("/var/lib/flotilla/f.db".into()))
        );
        assert_eq!(
            "sqlite:rel.db?mode=rwc".parse::<DatabaseUrl>(),
            Ok(DatabaseUrl::Sqlite("rel.db".into()))
        );
        for bad in ["mysql://h/d", "sqlite://", ""] {
            assert!(bad.parse::<DatabaseUrl>().is_err(), "{bad}");
        }
        // Refused before sqlx parses them (it would log an unknown parameter's value, and
        // read an unencoded '/' in a password as the end of the host).
        for (bad, says) in [
            ("postgres://u@h/d?passwd=s3cr3t", "passwd"),
            ("postgres://u@h/d?sslpassword=s3cr3t", "sslpassword"),
            ("postgres://u:12/s3cr3t@h/d", "percent-encode"),
            ("postgres://u:a#s3cr3t@h/d", "percent-encode"),
        ] {
            let e = bad.parse::<DatabaseUrl>().unwrap_err();
            assert!(e.contains(says) && !e.contains("s3cr3t"), "{bad}: {e}");
        }
        assert!(
            "postgres://u:12%2Fs3cr3t@h/d?sslmode=require&options[search_path]=x"
                .parse::<DatabaseUrl>()
                .is_ok()
        );
        // Error text that quotes the URL or the password loses the password, raw and decoded.
        let url = "postgres://u:p%40ss@h/d?password=other";
        assert_eq!(
            redact(&format!("failed: {url} (p@ss, other)"), url),
            "failed: postgres://u:<redacted>@h/d?password=<redacted> (<redacted>, <redacted>)"
        );
    }

    /// SQLite's plan for a statement on `conn`, one detail line each ("SCAN t" is a full scan).
    async fn plan(conn: &mut sqlx::AnyConnection, sql: &str) -> Vec<String> {
        let explain = format!("EXPLAIN QUERY PLAN {sql}");
        let mut q = sqlx::query_as::<_, (i64, i64, i64, String)>(&explain);
        for _ in 0..sql.matches('$').count() {
            q = q.bind(50_i64);
        }
        let rows = q.fetch_all(conn).await.unwrap();
        rows.into_iter().map(|r| r.3).collect()
    }

    #[tokio::test]
    async fn the_half_second_sweeps_and_the_audit_filter_use_their_indexes_not_full_scans() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_file(&dir.path().join("db")).await.unwrap();
        // A fleet's worth of rows: on near-empty tables SQLite rightly prefers a scan.
        sqlx::raw_sql(
            "INSERT INTO users (username, email, password_hash, role, created_at) VALUES ('o', 'o@x', 'h', 'admin', 0);
             WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < 5000)
             INSERT INTO devices (device_id, owner_id, name, online, last_seen, created_at) SELECT 'd' || k, 1, 'd', k % 2, k, 0 FROM n;
             WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < 20000)
             INSERT INTO commands (id, device_id, name, args, state, created_at, expires_at) SELECT 'c' || k, 'd' || (k % 5000), 'led', '{}', CASE WHEN k % 100 = 0 THEN 'queued' ELSE 'succeeded' END, k, k FROM n;
             WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < 20000)
             INSERT INTO audit (at, actor, action, result) SELECT k, 'a', 'action.' || (k % 40), 'success' FROM n;
             WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < 5000)
             INSERT INTO rollouts (id, version, config, state, created_at, updated_at) SELECT 'r' || k, '1.0.0', '{}', CASE WHEN k % 500 = 0 THEN 'running' ELSE 'completed' END, k, k FROM n;
             ANALYZE;
",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        // A connection opened after ANALYZE: one pooled before it keeps the statistics it
        // loaded with its schema, and may plan as if the tables were empty.
        let mut conn = {
            use sqlx::Connection;
            sqlx::AnyConnection::connect(&format!("sqlite://{}", dir.path().join("db").display()))
                .await
                .unwrap()
        };
        for (sql, index) in [
            (commands::OPEN_COMMAND_DUE, "commands_expiry"),
            (devices::SILENT_DEVICE_EXISTS, "devices_presence"),
            (audit::AUDIT_BY_ACTION, "audit_action"),
            (rollouts::OPEN_ROLLOUTS, "rollouts_state"),
            (rollouts::PENDING_CONTROLS, "rollouts_pending_control"),
        ] {
            let plan = plan(&mut conn, sql).await;
            assert!(
                plan.iter().all(|step| !step.starts_with("SCAN"))
                    && plan.iter().any(|s| s.contains(index)),
                "{sql}: {plan:?}"
            );
        }
    }

    #[tokio::test]
    async fn sweeps_with_nothing_to_do_never_wait_for_the_write_lock() {
        use sqlx::Connection;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open_with_busy_timeout(
            &DatabaseUrl::Sqlite(path.clone()),
            Duration::from_millis(50),
        )
        .await
        .unwrap();
        let mut writer = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut writer)
            .await
            .unwrap();
        // A write here would fail with SQLITE_BUSY after 50 ms.
        assert_eq!(store.expire_commands().await.unwrap(), 0);
        assert!(
            store
                .expire_silent_devices(now_ms())
                .await
                .unwrap()
                .is_empty()
        );
        sqlx::query("COMMIT").execute(&mut writer).await.unwrap();
    }
}
