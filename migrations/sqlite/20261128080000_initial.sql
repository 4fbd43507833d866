-- compressd initial schema (SQLite): models, datasets, jobs, job events, artifacts.
-- Types: ids are lower-case hyphenated UUID text (sorts like the UUID bytes, so v7 ids sort by time);
-- times are UTC text in one fixed format, 'YYYY-MM-DDTHH:MM:SS.ffffffZ', so text order is time order;
-- JSON is text.

CREATE TABLE models (
    id           TEXT PRIMARY KEY NOT NULL,  -- UUID v7, made by the API's clock
    name         TEXT NOT NULL,
    architecture TEXT NOT NULL,              -- family the engine loads it as: bert, llama
    format       TEXT NOT NULL,              -- safetensors | gguf
    uri          TEXT NOT NULL,              -- artifact-store location of its files
    bytes        INTEGER NOT NULL CHECK (bytes >= 0),
    sha256       TEXT NOT NULL,
    metadata     TEXT NOT NULL DEFAULT '{}', -- facts found when it was registered
    created_at   TEXT NOT NULL
);

CREATE TABLE datasets (
    id         TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    format     TEXT NOT NULL,                -- jsonl | csv | text
    uri        TEXT NOT NULL,
    bytes      INTEGER NOT NULL CHECK (bytes >= 0),
    sha256     TEXT NOT NULL,
    rows       INTEGER NOT NULL CHECK (rows >= 0),
    metadata   TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY NOT NULL, -- UUID v7: ordering by id is ordering by creation time
    name             TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    spec             TEXT NOT NULL,             -- the spec as accepted, defaults filled in
    -- Kept when the input is deleted later (SET NULL): the spec still names it, history stays.
    model_id         TEXT REFERENCES models (id) ON DELETE SET NULL,
    dataset_id       TEXT REFERENCES datasets (id) ON DELETE SET NULL,
    priority         INTEGER NOT NULL DEFAULT 0,        -- higher is claimed first
    attempt          INTEGER NOT NULL DEFAULT 0,        -- attempts started; fences a worker's writes
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    run_after        TEXT NOT NULL,                     -- not claimable before (retry back-off)
    lease_owner      TEXT,                              -- worker holding the job while running
    lease_expires_at TEXT,                              -- reclaimable after this unless heartbeated
    cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    idempotency_key  TEXT UNIQUE,                       -- client's Idempotency-Key header
    request_hash     TEXT,                              -- sha256 of the normalized request
    progress         TEXT,
    result           TEXT,
    error            TEXT,                              -- {code, message}
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT,
    updated_at       TEXT NOT NULL,
    CHECK ((idempotency_key IS NULL) = (request_hash IS NULL))
);

CREATE INDEX jobs_status_id ON jobs (status, id DESC);
CREATE INDEX jobs_queue ON jobs (priority DESC, run_after, id) WHERE status = 'queued';
CREATE INDEX jobs_lease ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_model ON jobs (model_id);
CREATE INDEX jobs_dataset ON jobs (dataset_id);

CREATE TABLE job_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT, -- global order, never reused; SSE clients resume from it
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt    INTEGER NOT NULL,
    type       TEXT NOT NULL,
    payload    TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);

CREATE INDEX job_events_job_seq ON job_events (job_id, seq);

CREATE TABLE artifacts (
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt    INTEGER NOT NULL,
    name       TEXT NOT NULL,
    kind       TEXT NOT NULL,                 -- model | report | checkpoint | log
    format     TEXT NOT NULL,
    bytes      INTEGER NOT NULL CHECK (bytes >= 0),
    sha256     TEXT NOT NULL,
    uri        TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (job_id, name)
);
