-- Per-key limits (NULL: the configured default, 0: no limit).
ALTER TABLE api_keys ADD COLUMN rpm INTEGER;
ALTER TABLE api_keys ADD COLUMN ipm INTEGER;
ALTER TABLE api_keys ADD COLUMN concurrency INTEGER;
ALTER TABLE api_keys ADD COLUMN max_n INTEGER;
-- Idempotency-Key: one row per (account, key); the primary key makes the claim an
-- INSERT only one process can win. `response` holds the serialized response message
-- (or `error` the domain error) once the request is done.
CREATE TABLE idempotency_keys (
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    key TEXT NOT NULL,
    request_hash BLOB NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done')),
    -- Tells this claim from a later takeover of it.
    token TEXT NOT NULL,
    -- The Instance running the claim: a stopped owner's claim is taken over at once.
    owner TEXT,
    response BLOB,
    error TEXT,
    created_at REAL NOT NULL,
    locked_until REAL NOT NULL,
    PRIMARY KEY (account_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
