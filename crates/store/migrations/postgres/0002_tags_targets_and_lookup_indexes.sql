-- Lookups by something other than a primary key: tokens by expiry, a device's open updates,
-- devices by hardware and presence.
CREATE INDEX provisioning_tokens_expiry ON provisioning_tokens(expires_at);
CREATE INDEX ota_updates_open ON ota_updates(device_id, state);
-- At most one open offer per device, whatever runs concurrently.
CREATE UNIQUE INDEX ota_updates_one_open ON ota_updates(device_id)
    WHERE state IN ('offered', 'started', 'in_progress');
CREATE INDEX devices_hardware_online ON devices(hardware, online);

-- A device's tags and a rollout's targets as rows instead of JSON arrays.
CREATE TABLE device_tags (
    device_id TEXT COLLATE "C" NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
    tag TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_tag ON device_tags(tag, device_id);
-- The server wrote these arrays, so they are valid JSON; elements that are not strings are
-- dropped, as on SQLite.
INSERT INTO device_tags (device_id, tag)
    SELECT d.device_id, e #>> '{}' FROM devices d,
        jsonb_array_elements(CASE WHEN jsonb_typeof(d.tags::jsonb) = 'array' THEN d.tags::jsonb ELSE '[]' END) AS e
    WHERE jsonb_typeof(e) = 'string'
    ON CONFLICT DO NOTHING;
ALTER TABLE devices DROP COLUMN tags;

CREATE TABLE rollout_targets (
    rollout_id TEXT COLLATE "C" NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
    position BIGINT NOT NULL,
    device_id TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (rollout_id, position)
);
INSERT INTO rollout_targets (rollout_id, position, device_id)
    SELECT r.id, t.ord - 1, t.e #>> '{}'
    FROM rollouts r,
        jsonb_array_elements(CASE WHEN jsonb_typeof(r.targets::jsonb) = 'array' THEN r.targets::jsonb ELSE '[]' END)
            WITH ORDINALITY AS t(e, ord)
    WHERE jsonb_typeof(t.e) = 'string';
ALTER TABLE rollouts DROP COLUMN targets;
