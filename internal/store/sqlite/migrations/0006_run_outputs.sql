-- Rich results of a run: the repr of its trailing expression (NULL: none), its outputs (a JSON
-- array of {"type", "kind", "path", "size"}; NULL: none) and whether some were left out.
ALTER TABLE runs ADD COLUMN display TEXT;
ALTER TABLE runs ADD COLUMN outputs TEXT;
ALTER TABLE runs ADD COLUMN outputs_truncated INTEGER NOT NULL DEFAULT 0;
