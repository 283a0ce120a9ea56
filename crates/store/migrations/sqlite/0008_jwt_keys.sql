-- The public keys that verify user tokens, by key id: each replica signs with a private key
-- of its own (in its data dir) and publishes the public half here, so any replica verifies a
-- token any other issued. No secret is stored.
CREATE TABLE jwt_keys (
    kid TEXT PRIMARY KEY,
    public_key_pem TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
