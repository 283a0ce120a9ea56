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
    device_id TEXT NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_tag ON device_tags(tag, device_id);
INSERT INTO device_tags (device_id, tag)
    SELECT d.device_id, j.value FROM devices d, json_each(d.tags) j
    WHERE json_valid(d.tags) AND j.type = 'text'
    ON CONFLICT DO NOTHING;
ALTER TABLE devices DROP COLUMN tags;

CREATE TABLE rollout_targets (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (rollout_id, position)
);
INSERT INTO rollout_targets (rollout_id, position, device_id)
    SELECT r.id, j.key, j.value FROM rollouts r, json_each(r.targets) j
    WHERE json_valid(r.targets) AND j.type = 'text';
ALTER TABLE rollouts DROP COLUMN targets;
