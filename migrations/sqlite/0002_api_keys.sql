-- API keys for the MCP API. Only a SHA-256 of each secret is stored; the secret is shown once at
-- creation. `scopes` and `allowed_hosts` are JSON arrays of strings. A revoked key keeps its row
-- (audit names it) with `revoked_at` set.
CREATE TABLE kiln_api_keys (
    key_id        TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    allowed_hosts TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    revoked_at    TEXT
);
