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
