//! Forward-only schema migrations, one set per backend, run by sqlx's migrator: each in its own
//! transaction, under the migrator's lock (an advisory lock on PostgreSQL), so replicas that
//! start together apply each migration once.

use std::borrow::Cow;

use futures::future::BoxFuture;
use sqlx::AnyPool;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

use super::Backend;

/// (version, description, SQL) embedded in the binary.
type Embedded = &'static [(i64, &'static str, &'static str)];

const SQLITE: Embedded = &[
    (
        1,
        "initial",
        include_str!("../migrations/sqlite/0001_initial.sql"),
    ),
    (
        2,
        "device uptime",
        include_str!("../migrations/sqlite/0002_device_uptime.sql"),
    ),
    (
        3,
        "releases and ota",
        include_str!("../migrations/sqlite/0003_releases_and_ota.sql"),
    ),
    (
        4,
        "dead letters and retained",
        include_str!("../migrations/sqlite/0004_dead_letters_and_retained.sql"),
    ),
    (
        5,
        "sweep indexes",
        include_str!("../migrations/sqlite/0005_sweep_indexes.sql"),
    ),
    (
        6,
        "tags, targets and lookup indexes",
        include_str!("../migrations/sqlite/0006_tags_targets_and_lookup_indexes.sql"),
    ),
    (
        7,
        "certificates",
        include_str!("../migrations/sqlite/0007_certificates.sql"),
    ),
    (
        8,
        "jwt keys",
        include_str!("../migrations/sqlite/0008_jwt_keys.sql"),
    ),
    (
        9,
        "attempt counts",
        include_str!("../migrations/sqlite/0009_attempt_counts.sql"),
    ),
    (
        10,
        "leases",
        include_str!("../migrations/sqlite/0010_leases.sql"),
    ),
    (
        11,
        "certificates of unknown expiry",
        include_str!("../migrations/sqlite/0011_certificates_unknown_expiry.sql"),
    ),
    (
        12,
        "rollout target states",
        include_str!("../migrations/sqlite/0012_rollout_target_states.sql"),
    ),
    (
        13,
        "rollout lookups",
        include_str!("../migrations/sqlite/0013_rollout_lookups.sql"),
    ),
    (
        14,
        "certificate renewal",
        include_str!("../migrations/sqlite/0014_certificate_renewal.sql"),
    ),
    (
        15,
        "device config",
        include_str!("../migrations/sqlite/0015_device_config.sql"),
    ),
    (
        16,
        "audit chain",
        include_str!("../migrations/sqlite/0016_audit_chain.sql"),
    ),
    (
        17,
        "retention",
        include_str!("../migrations/sqlite/0017_retention.sql"),
    ),
    (
        18,
        "update order",
        include_str!("../migrations/sqlite/0018_update_order.sql"),
    ),
];

const POSTGRES: Embedded = &[
    (
        1,
        "schema",
        include_str!("../migrations/postgres/0001_schema.sql"),
    ),
    (
        2,
        "tags, targets and lookup indexes",
        include_str!("../migrations/postgres/0002_tags_targets_and_lookup_indexes.sql"),
    ),
    (
        3,
        "certificates",
        include_str!("../migrations/postgres/0003_certificates.sql"),
    ),
    (
        4,
        "jwt keys",
        include_str!("../migrations/postgres/0004_jwt_keys.sql"),
    ),
    (
        5,
        "attempt counts",
        include_str!("../migrations/postgres/0005_attempt_counts.sql"),
    ),
    (
        6,
        "leases",
        include_str!("../migrations/postgres/0006_leases.sql"),
    ),
    (
        7,
        "certificates of unknown expiry",
        include_str!("../migrations/postgres/0007_certificates_unknown_expiry.sql"),
    ),
    (
        8,
        "rollout target states",
        include_str!("../migrations/postgres/0008_rollout_target_states.sql"),
    ),
    (
        9,
        "rollout lookups",
        include_str!("../migrations/postgres/0009_rollout_lookups.sql"),
    ),
    (
        10,
        "certificate renewal",
        include_str!("../migrations/postgres/0010_certificate_renewal.sql"),
    ),
    (
        11,
        "device config",
        include_str!("../migrations/postgres/0011_device_config.sql"),
    ),
    (
        12,
        "audit chain",
        include_str!("../migrations/postgres/0012_audit_chain.sql"),
    ),
    (
        13,
        "retention",
        include_str!("../migrations/postgres/0013_retention.sql"),
    ),
    (
        14,
        "command notify",
        include_str!("../migrations/postgres/0014_command_notify.sql"),
    ),
    (
        15,
        "update order",
        include_str!("../migrations/postgres/0015_update_order.sql"),
    ),
];

#[derive(Debug)]
struct Source(Embedded);

impl MigrationSource<'static> for Source {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move { Ok(migrations(self.0)) })
    }
}

fn migrations(set: Embedded) -> Vec<Migration> {
    set.iter()
        .map(|(version, description, sql)| {
            Migration::new(
                *version,
                Cow::Borrowed(description),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect()
}

pub async fn run(pool: &AnyPool, backend: Backend) -> anyhow::Result<()> {
    let migrator = match backend {
        Backend::Sqlite => {
            adopt_legacy_versions(pool).await?;
            Migrator::new(Source(SQLITE)).await?
        }
        Backend::Postgres => Migrator::new(Source(POSTGRES)).await?,
    };
    // On a connection of its own without the pool's lock timeout: a replica starting while
    // another runs a long migration waits for the migrator's lock instead of failing.
    let mut conn = pool.acquire().await?;
    if backend == Backend::Postgres {
        sqlx::raw_sql("SET lock_timeout = 0")
            .execute(&mut *conn)
            .await?;
    }
    let result = migrator.run(&mut *conn).await;
    // Never back in the pool with lock_timeout 0; a failure to close matters less than the
    // migration's own result.
    let _ = conn.close().await;
    Ok(result?)
}

/// Databases made before sqlx's migrator kept their applied versions in `schema_migrations`
/// (same SQL, same numbers): those versions are recorded as applied in sqlx's table, once.
async fn adopt_legacy_versions(pool: &AnyPool) -> anyhow::Result<()> {
    let legacy: Option<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
    )
    .fetch_optional(pool)
    .await?;
    if legacy.is_none() {
        return Ok(());
    }
    // Under the write lock, and looked for again there: a second process (`admin create`
    // beside the server) may have adopted them in between.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let still: Option<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
    )
    .fetch_optional(&mut *tx)
    .await?;
    if still.is_none() {
        return Ok(());
    }
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
            version BIGINT PRIMARY KEY,
            description TEXT NOT NULL,
            installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
            success BOOLEAN NOT NULL,
            checksum BLOB NOT NULL,
            execution_time BIGINT NOT NULL
        )",
    )
    .execute(&mut *tx)
    .await?;
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
        .fetch_all(&mut *tx)
        .await?;
    for m in migrations(SQLITE)
        .into_iter()
        .filter(|m| applied.contains(&m.version))
    {
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, $2, 1, $3, 0) ON CONFLICT DO NOTHING",
        )
        .bind(m.version)
        .bind(m.description.to_string())
        .bind(m.checksum.to_vec())
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DROP TABLE schema_migrations")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}
