-- Attempts counted in fixed windows, shared by every replica on one database (failed logins
-- by account and address, by address): two replicas must not each allow the limit.
CREATE TABLE attempt_counts (
    key TEXT PRIMARY KEY,
    window_start INTEGER NOT NULL,
    attempts INTEGER NOT NULL
);
CREATE INDEX attempt_counts_window ON attempt_counts(window_start);
