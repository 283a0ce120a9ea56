-- The audit log as a hash chain (crates/audit): each record's position (seq, in commit
-- order), the hash of the record before it and its own. Rows written before this migration
-- are chained, in id order, when the store opens. audit_chain holds the head (its row lock
-- puts appends in order) and how far an operator has exported the log; audit_checkpoints
-- the signed statements that let the log start after removed records and catch a cut tail.
ALTER TABLE audit ADD COLUMN seq BIGINT;
ALTER TABLE audit ADD COLUMN prev_hash TEXT;
ALTER TABLE audit ADD COLUMN hash TEXT;
CREATE UNIQUE INDEX audit_seq ON audit(seq);
CREATE TABLE audit_chain (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    exported_through BIGINT NOT NULL DEFAULT 0
);
INSERT INTO audit_chain (id, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
CREATE TABLE audit_checkpoints (
    seq BIGINT PRIMARY KEY,
    hash TEXT NOT NULL,
    at BIGINT NOT NULL,
    removed BIGINT NOT NULL,
    signature TEXT NOT NULL
);
