-- The route(s) that served a settled request, and their upstream list cost (margins).
ALTER TABLE reservations ADD COLUMN provider TEXT NOT NULL DEFAULT '';
ALTER TABLE reservations ADD COLUMN upstream_model TEXT NOT NULL DEFAULT '';
ALTER TABLE reservations ADD COLUMN upstream_cost_micros INTEGER NOT NULL DEFAULT 0;
