-- The bytes used on a sandbox's disk: the last figure while it lived (resources.disk).
ALTER TABLE sandboxes ADD COLUMN disk_used_bytes INTEGER NOT NULL DEFAULT 0;
