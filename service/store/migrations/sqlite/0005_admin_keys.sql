-- Admin keys (the AdminService's credential): only their SHA-256 is kept, as for
-- API keys. None exists until `imagegate admin-keys create` makes one.
CREATE TABLE admin_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_hash BLOB NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked_at REAL
);
-- A key's last use (the admin API's key lists) without a scan of every request.
CREATE INDEX reservations_key ON reservations (key_id, created_at);
