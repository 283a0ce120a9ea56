-- Who runs the background work of a set of replicas: one holder per lease at a time, and an
-- epoch that grows each time the lease changes hands (or lapses), so work started under an
-- old epoch can be refused once a new one began.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
