-- The device twin: the configuration an operator wants (published retained on
-- devices/{id}/config) and the one the device reports it runs with (its status message), each
-- as the protocol's JSON, with when it last changed.
ALTER TABLE devices ADD COLUMN desired_config TEXT;
ALTER TABLE devices ADD COLUMN desired_config_at INTEGER;
ALTER TABLE devices ADD COLUMN reported_config TEXT;
ALTER TABLE devices ADD COLUMN reported_config_at INTEGER;
