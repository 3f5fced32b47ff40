-- API replicas sharing the database (one, for SQLite: a data directory has one server), and the
-- replica that owns each sandbox ('' for records from before replicas: the local server's).
CREATE TABLE replicas (
    id           TEXT PRIMARY KEY,
    address      TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL,
    lost_at      TEXT
);
ALTER TABLE sandboxes ADD COLUMN replica TEXT NOT NULL DEFAULT '';
