-- The SQLite schema's version 1 in PostgreSQL types. Money is BIGINT micro-USD;
-- times are epoch seconds (DOUBLE PRECISION), as the store interface and SQLite have them.
CREATE TABLE accounts (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    -- The CHECK is a backstop: reserve() never lets a balance go below zero.
    balance_micros BIGINT NOT NULL CHECK (balance_micros >= 0),
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_hash BYTEA NOT NULL UNIQUE,
    models TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);
CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    -- Insertion order, for "newest first" among equal timestamps (SQLite's rowid).
    seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    key_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    n INTEGER NOT NULL,
    size TEXT NOT NULL,
    quality TEXT NOT NULL,
    amount_micros BIGINT NOT NULL,
    cost_micros BIGINT NOT NULL DEFAULT 0,
    status TEXT NOT NULL CHECK (status IN ('held', 'settled', 'released')),
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    resolved_at DOUBLE PRECISION
);
CREATE INDEX reservations_held ON reservations (status, expires_at);
CREATE INDEX reservations_account ON reservations (account_id, created_at);
CREATE TABLE ledger (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    delta_micros BIGINT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('credit', 'reserve', 'refund')),
    reservation_id TEXT,
    note TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX ledger_account ON ledger (account_id);
