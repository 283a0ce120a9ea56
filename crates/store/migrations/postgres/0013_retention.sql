-- Retention removes rows by age in batches; each kind's age column gets an index so a batch
-- reads only what it deletes. retention_runs keeps what the last run of each kind removed,
-- for /api/admin/stats.
CREATE INDEX telemetry_received ON telemetry(received_at);
CREATE INDEX ota_events_at ON ota_events(at);
CREATE INDEX commands_completed ON commands(completed_at) WHERE completed_at IS NOT NULL;
CREATE INDEX dead_letters_at ON dead_letters(at);
CREATE TABLE retention_runs (
    kind TEXT COLLATE "C" PRIMARY KEY,
    at BIGINT NOT NULL,
    deleted BIGINT NOT NULL,
    total_deleted BIGINT NOT NULL
);
