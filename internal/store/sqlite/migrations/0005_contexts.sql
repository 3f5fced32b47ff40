-- Code contexts: long-lived interpreters of a sandbox (records; the interpreters are the driver's).
CREATE TABLE contexts (
    seq          INTEGER PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    sandbox_id   TEXT NOT NULL REFERENCES sandboxes (id),
    account_id   TEXT NOT NULL,
    status       TEXT NOT NULL,
    reset_reason TEXT NOT NULL DEFAULT '',
    created_at   TEXT NOT NULL,
    deleted_at   TEXT,
    runs         INTEGER NOT NULL DEFAULT 0
);
-- ListContexts and the limit check in CreateContext.
CREATE INDEX contexts_sandbox ON contexts (sandbox_id, seq);
-- The context a run executed in ('' for a fresh run), and why its interpreter was fresh when the
-- run expected state ('' when it was not).
ALTER TABLE runs ADD COLUMN context_id TEXT NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN context_reset TEXT NOT NULL DEFAULT '';
