-- Who runs the background work of a set of replicas: one holder per lease at a time, and an
-- epoch that grows each time the lease changes hands (or lapses), so work started under an
-- old epoch can be refused once a new one began.
CREATE TABLE leases (
    name TEXT COLLATE "C" PRIMARY KEY,
    holder TEXT COLLATE "C" NOT NULL,
    epoch BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
