-- The schema imagegate created before versioned migrations, verbatim: databases
-- made then are recognised as version 1 (they have `accounts` but no schema_version).
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    -- The CHECK is a backstop: reserve() never lets a balance go below zero.
    balance_micros INTEGER NOT NULL CHECK (balance_micros >= 0),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_hash BLOB NOT NULL UNIQUE,
    models TEXT,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    key_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    n INTEGER NOT NULL,
    size TEXT NOT NULL,
    quality TEXT NOT NULL,
    amount_micros INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL CHECK (status IN ('held', 'settled', 'released')),
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    resolved_at REAL
);
CREATE INDEX IF NOT EXISTS reservations_held ON reservations (status, expires_at);
CREATE INDEX IF NOT EXISTS reservations_account ON reservations (account_id, created_at);
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    delta_micros INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('credit', 'reserve', 'refund')),
    reservation_id TEXT,
    note TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_account ON ledger (account_id);
