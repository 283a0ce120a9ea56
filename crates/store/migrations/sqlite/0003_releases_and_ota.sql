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
