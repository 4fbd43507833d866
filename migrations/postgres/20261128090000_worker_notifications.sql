-- Notifications for workers and event streams in every process (src/events/listener.rs).
-- NOTIFY is delivered on commit, so a listener never hears of a row it cannot read yet.
-- Payloads are hints only; readers re-read the tables, which stay the source of truth.

-- compressd_events '<job uuid>:<seq>': a job event was recorded; streams following the job read it.
CREATE FUNCTION compressd_notify_job_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('compressd_events', NEW.job_id::text || ':' || NEW.seq::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER job_events_notify AFTER INSERT ON job_events
    FOR EACH ROW EXECUTE FUNCTION compressd_notify_job_event();

-- compressd_queue '': a job became queued (new, or back after a failed attempt); idle workers claim.
-- compressd_cancel '<job uuid>': a cancel was asked for a running job; its worker stops it.
CREATE FUNCTION compressd_notify_job_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'queued' AND (TG_OP = 'INSERT' OR OLD.status <> 'queued') THEN
        PERFORM pg_notify('compressd_queue', '');
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.status = 'running' AND NEW.cancel_requested AND NOT OLD.cancel_requested THEN
        PERFORM pg_notify('compressd_cancel', NEW.id::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE OF status, cancel_requested ON jobs
    FOR EACH ROW EXECUTE FUNCTION compressd_notify_job_change();
