-- Reservation owners: each running service process records itself and a heartbeat,
-- so what a dead process held is released and what a live one holds is never touched.
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
-- The Instance holding a 'held' reservation; NULL for rows from before owners.
ALTER TABLE reservations ADD COLUMN owner TEXT;
CREATE INDEX IF NOT EXISTS reservations_owner ON reservations (owner) WHERE status = 'held';
