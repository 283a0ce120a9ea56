-- A device renewing its certificate holds two valid ones for a while: the current one, and the
-- pending one it was just issued. The pending one becomes current when the device connects with
-- it (or confirms it over mTLS); the old one is then revoked as superseded.
ALTER TABLE devices ADD COLUMN cert_pending_serial TEXT;
ALTER TABLE devices ADD COLUMN cert_pending_not_after INTEGER;
-- When the device last renewed: at most one renewal per interval (a lost answer is asked for
-- again later; a compromised device cannot fill the revocation list).
ALTER TABLE devices ADD COLUMN cert_renewed_at INTEGER;
-- The security report reads certificates about to expire.
CREATE INDEX devices_cert_not_after ON devices(cert_not_after) WHERE cert_serial IS NOT NULL;
