-- 0001: the initial schema.
--
-- Times are TEXT in one fixed-width UTC form, "2026-04-06T14:23:11.123456789Z", so that comparing
-- the strings compares the instants (range filters and ORDER BY work on the text). JSON columns
-- are TEXT holding valid JSON, NULL when unset. Tables whose listings need a stable order carry an
-- explicit INTEGER PRIMARY KEY (seq): it is the insertion order, survives VACUUM, and breaks ties
-- between equal timestamps.

CREATE TABLE accounts (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    plan       TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    key_hash   BLOB NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE sandboxes (
    seq            INTEGER PRIMARY KEY,
    id             TEXT NOT NULL UNIQUE,
    account_id     TEXT NOT NULL REFERENCES accounts (id),
    agent_id       TEXT NOT NULL,
    mode           TEXT NOT NULL,
    status         TEXT NOT NULL,
    config         TEXT,
    created_at     TEXT NOT NULL,
    ready_at       TEXT,
    expires_at     TEXT NOT NULL,
    destroyed_at   TEXT,
    destroy_reason TEXT NOT NULL DEFAULT '',
    error          TEXT
);
-- ListSandboxes (newest first) and Usage (by created_at range).
CREATE INDEX sandboxes_account_created ON sandboxes (account_id, created_at DESC, seq DESC);
-- The concurrency check in CreateSandbox counts an account's live sandboxes.
CREATE INDEX sandboxes_account_status ON sandboxes (account_id, status);
-- LiveSandboxes.
CREATE INDEX sandboxes_status ON sandboxes (status);

CREATE TABLE runs (
    seq               INTEGER PRIMARY KEY,
    id                TEXT NOT NULL UNIQUE,
    sandbox_id        TEXT NOT NULL REFERENCES sandboxes (id),
    account_id        TEXT NOT NULL,
    status            TEXT NOT NULL,
    code              TEXT NOT NULL,
    timeout_seconds   INTEGER NOT NULL,
    async             INTEGER NOT NULL,
    exit_code         INTEGER,
    stdout            TEXT NOT NULL,
    stderr            TEXT NOT NULL,
    stdout_truncated  INTEGER NOT NULL,
    stderr_truncated  INTEGER NOT NULL,
    result            TEXT,
    error             TEXT,
    created_at        TEXT NOT NULL,
    started_at        TEXT,
    finished_at       TEXT,
    duration_ms       INTEGER NOT NULL,
    cpu_ms            INTEGER NOT NULL,
    memory_peak_bytes INTEGER NOT NULL
);
-- ListRuns (newest first), SandboxUsage and EndOpenRuns (by sandbox_id prefix).
CREATE INDEX runs_sandbox_created ON runs (sandbox_id, created_at DESC, seq DESC);
-- Usage (an account's runs by created_at range).
CREATE INDEX runs_account_created ON runs (account_id, created_at);

CREATE TABLE events (
    seq        INTEGER PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL,           -- '' for events of no account (auth.failed)
    type       TEXT NOT NULL,
    at         TEXT NOT NULL,
    sandbox_id TEXT NOT NULL DEFAULT '',
    run_id     TEXT NOT NULL DEFAULT '',
    agent_id   TEXT NOT NULL DEFAULT '',
    detail     TEXT
);
CREATE INDEX events_account_at ON events (account_id, at, seq);
CREATE INDEX events_sandbox_at ON events (sandbox_id, at, seq);
CREATE INDEX events_at ON events (at, seq);
