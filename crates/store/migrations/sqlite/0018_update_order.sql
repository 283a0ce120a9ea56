-- The receive time of the message that last set each group of a device's fields: presence
-- (online and its reason), health (heartbeats), the reported status and the firmware
-- version (reported by both). One device's messages
-- can be taken by two replicas and committed in either order; one received earlier and
-- committed later leaves a newer group as it is.
ALTER TABLE devices ADD COLUMN presence_at INTEGER;
ALTER TABLE devices ADD COLUMN health_at INTEGER;
ALTER TABLE devices ADD COLUMN status_at INTEGER;
ALTER TABLE devices ADD COLUMN fw_at INTEGER;
-- The leader's health gate reads the heartbeats stored since its last look.
CREATE INDEX devices_by_health_at ON devices (health_at);
