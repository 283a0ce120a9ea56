-- The receive time of the message that last set each group of a device's fields: presence
-- (online and its reason), health (heartbeats), the reported status and the firmware
-- version (reported by both). One device's messages
-- can be taken by two replicas and committed in either order; one received earlier and
-- committed later leaves a newer group as it is.
ALTER TABLE devices ADD COLUMN presence_at BIGINT;
ALTER TABLE devices ADD COLUMN health_at BIGINT;
ALTER TABLE devices ADD COLUMN status_at BIGINT;
ALTER TABLE devices ADD COLUMN fw_at BIGINT;
-- The order key (flotilla_proto::order_key) of the message that last set each group, for
-- devices that number their messages: it decides where receive times cannot (a backlog a
-- replica drains late). NULL: by receive time.
ALTER TABLE devices ADD COLUMN presence_ord BIGINT;
ALTER TABLE devices ADD COLUMN health_ord BIGINT;
ALTER TABLE devices ADD COLUMN status_ord BIGINT;
ALTER TABLE devices ADD COLUMN fw_ord BIGINT;
-- The leader's health gate reads the heartbeats stored since its last look.
CREATE INDEX devices_by_health_at ON devices (health_at);
