-- The sweeps every 500 ms: open commands by deadline, online devices by last message.
CREATE INDEX commands_expiry ON commands(state, expires_at);
CREATE INDEX devices_presence ON devices(last_seen) WHERE online = 1;
CREATE INDEX audit_action ON audit(action, id);
