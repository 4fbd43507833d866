-- Signed webhooks (issue 18): subscriptions, a durable outbox of deliveries, and their attempts.
--
-- A tenant's webhooks have no job_id; a job's own (from its spec's `webhooks`) name the job and
-- go with it. `events` is comma-wrapped (',job.succeeded,job.failed,') so one substring test
-- matches an event name exactly.
CREATE TABLE webhooks (
    id         TEXT PRIMARY KEY NOT NULL,
    tenant     TEXT NOT NULL,
    job_id     TEXT REFERENCES jobs (id) ON DELETE CASCADE,
    url        TEXT NOT NULL,
    events     TEXT NOT NULL,
    secret     TEXT NOT NULL,               -- 'whsec_' + base64; shown once, at creation
    created_at TEXT NOT NULL
);

CREATE INDEX webhooks_tenant ON webhooks (tenant, id) WHERE job_id IS NULL;
CREATE INDEX webhooks_job ON webhooks (job_id) WHERE job_id IS NOT NULL;

-- One row per (webhook, event): written by the trigger below in the transaction that records the
-- event, so an event is never recorded without its deliveries. The row carries everything a
-- delivery needs (URL, secret, the exact body), so deleting the job later loses nothing; its id
-- is the stable `webhook-id` ('msg_<id>') of every attempt. Delivery loops claim due rows like
-- workers claim jobs: claiming pushes next_attempt_at one lease ahead, so a row whose claimer
-- died is due again once the lease has passed.
CREATE TABLE webhook_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id      TEXT NOT NULL,          -- no foreign key: the log outlives the subscription
    tenant          TEXT NOT NULL,
    job_id          TEXT NOT NULL,
    event_seq       INTEGER NOT NULL,
    event_type      TEXT NOT NULL,          -- the webhook event name, e.g. 'job.succeeded'
    url             TEXT NOT NULL,
    secret          TEXT NOT NULL,
    body            TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0, -- claims so far; an attempt's fence
    next_attempt_at TEXT NOT NULL,
    lease_owner     TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    UNIQUE (webhook_id, event_seq)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id, id);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, id);

CREATE TABLE webhook_attempts (
    delivery_id INTEGER NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    status_code INTEGER,                    -- NULL when no response came (network error, timeout)
    error       TEXT,                       -- NULL on a 2xx
    PRIMARY KEY (delivery_id, attempt)
);

-- Job events as webhook events: a worker's claim ('status' running) is job.started, a finished
-- stage stage.completed, and the terminal events their job.* names. Everything else sends nothing.
CREATE TRIGGER job_events_webhook_outbox AFTER INSERT ON job_events
WHEN NEW.type IN ('status', 'stage_finished', 'succeeded', 'failed', 'cancelled')
BEGIN
    INSERT INTO webhook_deliveries (webhook_id, tenant, job_id, event_seq, event_type, url, secret,
                                    body, next_attempt_at, created_at, updated_at)
    SELECT w.id, j.tenant, j.id, NEW.seq, e.name, w.url, w.secret,
           json_object('type', e.name, 'timestamp', NEW.created_at,
                       'data', json_object('job_id', j.id, 'job_name', j.name, 'status', j.status,
                                           'attempt', NEW.attempt, 'event_seq', NEW.seq,
                                           'event', json(NEW.payload))),
           NEW.created_at, NEW.created_at, NEW.created_at
    FROM (SELECT CASE NEW.type
                   WHEN 'succeeded' THEN 'job.succeeded'
                   WHEN 'failed' THEN 'job.failed'
                   WHEN 'cancelled' THEN 'job.cancelled'
                   WHEN 'stage_finished' THEN 'stage.completed'
                   WHEN 'status' THEN CASE WHEN json_extract(NEW.payload, '$.status') = 'running'
                                           THEN 'job.started' END
                 END AS name) AS e
    JOIN jobs AS j ON j.id = NEW.job_id
    JOIN webhooks AS w ON w.job_id = j.id OR (w.job_id IS NULL AND w.tenant = j.tenant)
    WHERE e.name IS NOT NULL AND instr(w.events, ',' || e.name || ',') > 0;
END;
