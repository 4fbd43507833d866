-- Tenants, API keys and the audit log (issue 17).
-- Every model, dataset and job belongs to a tenant; events and artifacts belong to their job's.
-- Rows made before tenants existed belong to 'default', the tenant of an unauthenticated server.

ALTER TABLE models ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
ALTER TABLE datasets ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';

CREATE INDEX models_tenant_id ON models (tenant, id DESC);
CREATE INDEX datasets_tenant_id ON datasets (tenant, id DESC);
CREATE INDEX jobs_tenant_id ON jobs (tenant, id DESC);

-- Idempotency keys are per tenant: the stored key is '<tenant>/<key>' (tenant names hold no '/'),
-- which keeps the column's UNIQUE constraint (SQLite cannot drop it without rebuilding the table).
UPDATE jobs SET idempotency_key = 'default/' || idempotency_key WHERE idempotency_key IS NOT NULL;

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY NOT NULL,  -- public part of the key (`cpd_<id>_<secret>`), shown by `keys list`
    tenant      TEXT NOT NULL,
    scopes      TEXT NOT NULL,              -- comma-separated: read, write, admin
    secret_hash TEXT NOT NULL,              -- sha256 (hex) of the secret part; the key itself is never stored
    created_at  TEXT NOT NULL,
    revoked_at  TEXT                        -- set by `keys revoke`; a revoked key is refused on its next request
);

CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT, -- order of recording; the listing's cursor
    at         TEXT NOT NULL,
    tenant     TEXT NOT NULL,
    key_id     TEXT,                              -- NULL when the server runs without auth
    method     TEXT NOT NULL,
    path       TEXT NOT NULL,
    status     INTEGER NOT NULL,                  -- the HTTP status answered
    request_id TEXT
);

CREATE INDEX audit_log_tenant_seq ON audit_log (tenant, seq);
