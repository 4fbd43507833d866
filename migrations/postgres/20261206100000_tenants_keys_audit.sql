-- Tenants, API keys and the audit log (issue 17).
-- Every model, dataset and job belongs to a tenant; events and artifacts belong to their job's.
-- Rows made before tenants existed belong to 'default', the tenant of an unauthenticated server.

ALTER TABLE models ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE datasets ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE jobs ADD COLUMN tenant text NOT NULL DEFAULT 'default';

CREATE INDEX models_tenant_id ON models (tenant, id DESC);
CREATE INDEX datasets_tenant_id ON datasets (tenant, id DESC);
CREATE INDEX jobs_tenant_id ON jobs (tenant, id DESC);

-- Idempotency keys are per tenant: the stored key is '<tenant>/<key>' (tenant names hold no '/'),
-- the same encoding as the SQLite backend, so one shared mapping reads both.
UPDATE jobs SET idempotency_key = 'default/' || idempotency_key WHERE idempotency_key IS NOT NULL;

CREATE TABLE api_keys (
    id          text PRIMARY KEY,             -- public part of the key (`cpd_<id>_<secret>`), shown by `keys list`
    tenant      text NOT NULL,
    scopes      text NOT NULL,                -- comma-separated: read, write, admin
    secret_hash text NOT NULL,                -- sha256 (hex) of the secret part; the key itself is never stored
    created_at  timestamptz NOT NULL,
    revoked_at  timestamptz                   -- set by `keys revoke`; a revoked key is refused on its next request
);

CREATE TABLE audit_log (
    seq        bigserial PRIMARY KEY,         -- order of recording; the listing's cursor
    at         timestamptz NOT NULL,
    tenant     text NOT NULL,
    key_id     text,                          -- NULL when the server runs without auth
    method     text NOT NULL,
    path       text NOT NULL,
    status     integer NOT NULL,              -- the HTTP status answered
    request_id text
);

CREATE INDEX audit_log_tenant_seq ON audit_log (tenant, seq);
