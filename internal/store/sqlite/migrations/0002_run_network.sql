-- Egress attempts of a run (network.allowed / network.denied decisions while it ran).
ALTER TABLE runs ADD COLUMN network_allowed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN network_denied INTEGER NOT NULL DEFAULT 0;
