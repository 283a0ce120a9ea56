-- Every device certificate the CA issued, so revoked serials can be listed in a CRL for an
-- external broker. A row outlives its device on purpose: a deleted device's certificate stays
-- revoked. Serials are lower-case hex as the CA writes them.
CREATE TABLE certificates (
    serial TEXT COLLATE "C" PRIMARY KEY,
    device_id TEXT COLLATE "C" NOT NULL,
    not_after BIGINT NOT NULL,
    issued_at BIGINT NOT NULL,
    revoked_at BIGINT,
    -- 'superseded' (the device got a new certificate) or 'revoked' (by an admin).
    revoke_reason TEXT
);
CREATE INDEX certificates_device ON certificates(device_id);
CREATE INDEX certificates_revoked ON certificates(revoked_at) WHERE revoked_at IS NOT NULL;
-- The serials issued before this table existed: the current one of each device. Earlier
-- ones were never recorded and cannot be listed.
INSERT INTO certificates (serial, device_id, not_after, issued_at)
    SELECT cert_serial, device_id, COALESCE(cert_not_after, 0), created_at
    FROM devices WHERE cert_serial IS NOT NULL
    ON CONFLICT DO NOTHING;
