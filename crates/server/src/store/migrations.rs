//! Forward-only schema migrations, applied in order inside one transaction each.

use sqlx::SqlitePool;

const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    username TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    blocked INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    owner_id INTEGER NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,
    blocked INTEGER NOT NULL DEFAULT 0,
    cert_serial TEXT,
    cert_not_after INTEGER,
    online INTEGER NOT NULL DEFAULT 0,
    last_seen INTEGER,
    disconnect_reason TEXT,
    fw_version TEXT,
    led_state TEXT,
    led_brightness INTEGER,
    heap INTEGER,
    rssi INTEGER,
    crashes INTEGER,
    created_at INTEGER NOT NULL
);
CREATE INDEX devices_owner ON devices(owner_id);
CREATE TABLE provisioning_tokens (
    token_hash TEXT PRIMARY KEY,
    owner_id INTEGER NOT NULL REFERENCES users(id),
    device_id TEXT,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    created_at INTEGER NOT NULL
);
CREATE TABLE telemetry (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    device_ts INTEGER,
    received_at INTEGER NOT NULL,
    pot INTEGER,
    switch INTEGER,
    temp REAL,
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE commands (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL,
    created_by INTEGER,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    sent_at INTEGER,
    delivered_at INTEGER,
    completed_at INTEGER,
    result TEXT,
    error TEXT
);
CREATE INDEX commands_open ON commands(device_id, state);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    result TEXT NOT NULL,
    detail TEXT
);
"#,
    ),
    (2, "ALTER TABLE devices ADD COLUMN uptime INTEGER;"),
    (
        3,
        r#"
ALTER TABLE devices ADD COLUMN hardware TEXT;
ALTER TABLE devices ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
CREATE TABLE releases (
    version TEXT PRIMARY KEY,
    hardware TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    security_counter INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    signature TEXT NOT NULL,
    ready INTEGER NOT NULL DEFAULT 0,
    blocked INTEGER NOT NULL DEFAULT 0,
    blocked_reason TEXT,
    created_by INTEGER,
    created_at INTEGER NOT NULL
);
CREATE TABLE ota_updates (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    version TEXT NOT NULL,
    force INTEGER NOT NULL,
    rollout_id TEXT,
    state TEXT NOT NULL,
    progress INTEGER,
    error TEXT,
    created_by INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX ota_updates_device ON ota_updates(device_id, created_at);
CREATE INDEX ota_updates_rollout ON ota_updates(rollout_id);
CREATE TABLE ota_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER,
    version TEXT,
    error TEXT
);
CREATE INDEX ota_events_update ON ota_events(update_id);
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    config TEXT NOT NULL,
    targets TEXT NOT NULL,
    state TEXT NOT NULL,
    phase INTEGER,
    created_by INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
"#,
    ),
    (
        4,
        r#"
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE retained (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
"#,
    ),
    (
        5,
        r#"
-- The sweeps every 500 ms: open commands by deadline, online devices by last message.
CREATE INDEX commands_expiry ON commands(state, expires_at);
CREATE INDEX devices_presence ON devices(last_seen) WHERE online = 1;
CREATE INDEX audit_action ON audit(action, id);
"#,
    ),
];

pub async fn run(pool: &SqlitePool) -> sqlx::Result<()> {
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
        .execute(pool)
        .await?;
    for (version, sql) in MIGRATIONS {
        let mut tx = pool.begin().await?;
        let done: Option<i64> =
            sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = ?")
                .bind(version)
                .fetch_optional(&mut *tx)
                .await?;
        if done.is_some() {
            continue;
        }
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)")
            .bind(version)
            .bind(super::now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}
