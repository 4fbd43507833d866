-- compressd initial schema (PostgreSQL): models, datasets, jobs, job events, artifacts.

CREATE TABLE models (
    id           uuid PRIMARY KEY,            -- UUID v7, made by the API's clock
    name         text NOT NULL,
    architecture text NOT NULL,               -- family the engine loads it as: bert, llama
    format       text NOT NULL,               -- safetensors | gguf
    uri          text NOT NULL,               -- artifact-store location of its files
    bytes        bigint NOT NULL CHECK (bytes >= 0),
    sha256       text NOT NULL,
    metadata     jsonb NOT NULL DEFAULT '{}', -- facts found when it was registered (config, parameter count)
    created_at   timestamptz NOT NULL
);

CREATE TABLE datasets (
    id         uuid PRIMARY KEY,
    name       text NOT NULL,
    format     text NOT NULL,                 -- jsonl | csv | text
    uri        text NOT NULL,
    bytes      bigint NOT NULL CHECK (bytes >= 0),
    sha256     text NOT NULL,
    rows       bigint NOT NULL CHECK (rows >= 0),
    metadata   jsonb NOT NULL DEFAULT '{}',   -- labels, splits, fields found when it was registered
    created_at timestamptz NOT NULL
);

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,        -- UUID v7: ordering by id is ordering by creation time
    name             text NOT NULL,
    status           text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    spec             jsonb NOT NULL,          -- the spec as accepted, defaults filled in
    -- Kept when the input is deleted later (SET NULL): the spec still names it, history stays.
    model_id         uuid REFERENCES models (id) ON DELETE SET NULL,
    dataset_id       uuid REFERENCES datasets (id) ON DELETE SET NULL,
    priority         integer NOT NULL DEFAULT 0,           -- higher is claimed first
    attempt          integer NOT NULL DEFAULT 0,           -- attempts started; fences a worker's writes
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    run_after        timestamptz NOT NULL,                 -- not claimable before (retry back-off)
    lease_owner      text,                                 -- worker holding the job while running
    lease_expires_at timestamptz,                          -- reclaimable after this unless heartbeated
    cancel_requested boolean NOT NULL DEFAULT false,       -- asked while running; the worker stops it
    idempotency_key  text UNIQUE,                          -- client's Idempotency-Key header
    request_hash     text,                                 -- sha256 of the normalized request, to tell retry from reuse
    progress         jsonb,
    result           jsonb,
    error            jsonb,                                -- {code, message}
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL,
    CHECK ((idempotency_key IS NULL) = (request_hash IS NULL))
);

-- Newest-first listing, with and without a status filter.
CREATE INDEX jobs_status_id ON jobs (status, id DESC);
-- The claim order of queued jobs.
CREATE INDEX jobs_queue ON jobs (priority DESC, run_after, id) WHERE status = 'queued';
-- Finding expired leases.
CREATE INDEX jobs_lease ON jobs (lease_expires_at) WHERE status = 'running';
-- Finding active jobs that use an input before deleting it.
CREATE INDEX jobs_model ON jobs (model_id);
CREATE INDEX jobs_dataset ON jobs (dataset_id);

CREATE TABLE job_events (
    seq        bigserial PRIMARY KEY,         -- global order; SSE clients resume from it
    job_id     uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt    integer NOT NULL,
    type       text NOT NULL,
    payload    jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL
);

CREATE INDEX job_events_job_seq ON job_events (job_id, seq);

CREATE TABLE artifacts (
    job_id     uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt    integer NOT NULL,              -- the attempt that wrote it
    name       text NOT NULL,
    kind       text NOT NULL,                 -- model | report | checkpoint | log
    format     text NOT NULL,
    bytes      bigint NOT NULL CHECK (bytes >= 0),
    sha256     text NOT NULL,
    uri        text NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (job_id, name)
);
