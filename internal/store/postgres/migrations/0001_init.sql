-- 0001: the schema (the SQLite store's 0001-0007, in PostgreSQL's types).
--
-- Times are timestamptz (microseconds). Text that a sandbox or an API caller chooses byte for byte
-- (code, output, a run's result and display) is bytea: PostgreSQL's text holds neither NUL nor
-- invalid UTF-8, and a run's record must not be lost to the bytes it printed. Tables whose
-- listings need a stable order carry seq, the insertion order, to break ties between equal times.

CREATE TABLE accounts (
    id         text PRIMARY KEY,
    name       text NOT NULL UNIQUE,
    plan       text NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE TABLE api_keys (
    id         text PRIMARY KEY,
    account_id text NOT NULL REFERENCES accounts (id),
    key_hash   bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL
);
CREATE INDEX api_keys_account ON api_keys (account_id);

-- API replicas sharing the database (see the package doc).
CREATE TABLE replicas (
    id           text PRIMARY KEY,
    address      text NOT NULL,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    lost_at      timestamptz
);

CREATE TABLE sandboxes (
    seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              text NOT NULL UNIQUE,
    account_id      text NOT NULL REFERENCES accounts (id),
    agent_id        text NOT NULL,
    mode            text NOT NULL,
    status          text NOT NULL,
    config          text,
    created_at      timestamptz NOT NULL,
    ready_at        timestamptz,
    expires_at      timestamptz NOT NULL,
    destroyed_at    timestamptz,
    destroy_reason  text NOT NULL DEFAULT '',
    error           text,
    disk_used_bytes bigint NOT NULL DEFAULT 0,
    image_digest    text NOT NULL DEFAULT '',
    replica         text NOT NULL DEFAULT ''
);
CREATE INDEX sandboxes_account_created ON sandboxes (account_id, created_at DESC, seq DESC);
-- The quota check counts an account's live sandboxes; LiveSandboxes lists every live one.
CREATE INDEX sandboxes_account_status ON sandboxes (account_id, status);
CREATE INDEX sandboxes_status ON sandboxes (status);

CREATE TABLE runs (
    seq               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                text NOT NULL UNIQUE,
    sandbox_id        text NOT NULL REFERENCES sandboxes (id),
    account_id        text NOT NULL,
    status            text NOT NULL,
    code              bytea NOT NULL,
    timeout_seconds   integer NOT NULL,
    async             boolean NOT NULL,
    exit_code         integer,
    stdout            bytea NOT NULL,
    stderr            bytea NOT NULL,
    stdout_truncated  boolean NOT NULL,
    stderr_truncated  boolean NOT NULL,
    result            bytea,
    error             text,
    created_at        timestamptz NOT NULL,
    started_at        timestamptz,
    finished_at       timestamptz,
    duration_ms       bigint NOT NULL,
    cpu_ms            bigint NOT NULL,
    memory_peak_bytes bigint NOT NULL,
    network_allowed   bigint NOT NULL DEFAULT 0,
    network_denied    bigint NOT NULL DEFAULT 0,
    context_id        text NOT NULL DEFAULT '',
    context_reset     text NOT NULL DEFAULT '',
    display           bytea,
    outputs           text,
    outputs_truncated boolean NOT NULL DEFAULT false
);
CREATE INDEX runs_sandbox_created ON runs (sandbox_id, created_at DESC, seq DESC);
CREATE INDEX runs_account_created ON runs (account_id, created_at);

CREATE TABLE events (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         text NOT NULL UNIQUE,
    account_id text NOT NULL,
    type       text NOT NULL,
    at         timestamptz NOT NULL,
    sandbox_id text NOT NULL DEFAULT '',
    run_id     text NOT NULL DEFAULT '',
    agent_id   text NOT NULL DEFAULT '',
    detail     text
);
CREATE INDEX events_account_at ON events (account_id, at, seq);
CREATE INDEX events_sandbox_at ON events (sandbox_id, at, seq);
CREATE INDEX events_at ON events (at, seq);

CREATE TABLE contexts (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           text NOT NULL UNIQUE,
    sandbox_id   text NOT NULL REFERENCES sandboxes (id),
    account_id   text NOT NULL,
    status       text NOT NULL,
    reset_reason text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL,
    deleted_at   timestamptz,
    runs         integer NOT NULL DEFAULT 0
);
CREATE INDEX contexts_sandbox ON contexts (sandbox_id, seq);
