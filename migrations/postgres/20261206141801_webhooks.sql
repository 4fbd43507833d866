-- Signed webhooks (issue 18): subscriptions, a durable outbox of deliveries, and their attempts.
--
-- A tenant's webhooks have no job_id; a job's own (from its spec's `webhooks`) name the job and
-- go with it. `events` is comma-wrapped (',job.succeeded,job.failed,') so one substring test
-- matches an event name exactly.
CREATE TABLE webhooks (
    id         uuid PRIMARY KEY,
    tenant     text NOT NULL,
    job_id     uuid REFERENCES jobs (id) ON DELETE CASCADE,
    url        text NOT NULL,
    events     text NOT NULL,
    secret     text NOT NULL,               -- 'whsec_' + base64; shown once, at creation
    created_at timestamptz NOT NULL
);

CREATE INDEX webhooks_tenant ON webhooks (tenant, id) WHERE job_id IS NULL;
CREATE INDEX webhooks_job ON webhooks (job_id) WHERE job_id IS NOT NULL;

-- One row per (webhook, event): written by the trigger below in the transaction that records the
-- event, so an event is never recorded without its deliveries. The row carries everything a
-- delivery needs (URL, secret, the exact body), so deleting the job later loses nothing; its id
-- is the stable `webhook-id` ('msg_<id>') of every attempt. Delivery loops claim due rows like
-- workers claim jobs (FOR UPDATE SKIP LOCKED): claiming pushes next_attempt_at one lease ahead,
-- so a row whose claimer died is due again once the lease has passed.
CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    webhook_id      uuid NOT NULL,          -- no foreign key: the log outlives the subscription
    tenant          text NOT NULL,
    job_id          uuid NOT NULL,
    event_seq       bigint NOT NULL,
    event_type      text NOT NULL,          -- the webhook event name, e.g. 'job.succeeded'
    url             text NOT NULL,
    secret          text NOT NULL,
    body            text NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0, -- claims so far; an attempt's fence
    next_attempt_at timestamptz NOT NULL,
    lease_owner     text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    UNIQUE (webhook_id, event_seq)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id, id);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, id);

CREATE TABLE webhook_attempts (
    delivery_id bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    status_code integer,                    -- NULL when no response came (network error, timeout)
    error       text,                       -- NULL on a 2xx
    PRIMARY KEY (delivery_id, attempt)
);

-- Job events as webhook events: a worker's claim ('status' running) is job.started, a finished
-- stage stage.completed, and the terminal events their job.* names. Everything else sends nothing.
CREATE FUNCTION compressd_webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event_name text;
BEGIN
    event_name := CASE NEW.type
              WHEN 'succeeded' THEN 'job.succeeded'
              WHEN 'failed' THEN 'job.failed'
              WHEN 'cancelled' THEN 'job.cancelled'
              WHEN 'stage_finished' THEN 'stage.completed'
              WHEN 'status' THEN CASE WHEN NEW.payload->>'status' = 'running' THEN 'job.started' END
            END;
    IF event_name IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_deliveries (webhook_id, tenant, job_id, event_seq, event_type, url, secret,
                                    body, next_attempt_at, created_at, updated_at)
    SELECT w.id, j.tenant, j.id, NEW.seq, event_name, w.url, w.secret,
           jsonb_build_object('type', event_name,
                              'timestamp', to_char(NEW.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                              'data', jsonb_build_object('job_id', j.id, 'job_name', j.name, 'status', j.status,
                                                         'attempt', NEW.attempt, 'event_seq', NEW.seq,
                                                         'event', NEW.payload))::text,
           NEW.created_at, NEW.created_at, NEW.created_at
    FROM jobs AS j
    JOIN webhooks AS w ON w.job_id = j.id OR (w.job_id IS NULL AND w.tenant = j.tenant)
    WHERE j.id = NEW.job_id AND strpos(w.events, ',' || event_name || ',') > 0;
    RETURN NULL;
END;
$$;

CREATE TRIGGER job_events_webhook_outbox AFTER INSERT ON job_events
    FOR EACH ROW EXECUTE FUNCTION compressd_webhook_outbox();
