-- The append-only event log. Positions come from kiln_log_head, whose single row every append
-- updates inside its transaction: appends commit one at a time in position order, so a reader
-- can never see position N+1 before N (the sequence-gap trap), and positions are gapless.
CREATE TABLE kiln_events (
    global_position BIGINT      PRIMARY KEY,
    event_id        UUID        NOT NULL UNIQUE,
    stream_id       TEXT        NOT NULL,
    stream_version  BIGINT      NOT NULL,
    event_type      TEXT        NOT NULL,
    schema_version  SMALLINT    NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor           TEXT        NOT NULL,
    correlation_id  UUID,
    causation_id    UUID,
    traceparent     TEXT,
    payload         JSONB       NOT NULL,
    UNIQUE (stream_id, stream_version)
);

CREATE TABLE kiln_log_head (
    id       SMALLINT PRIMARY KEY CHECK (id = 1),
    position BIGINT   NOT NULL
);
INSERT INTO kiln_log_head (id, position) VALUES (1, 0);

-- Where each projection has got to in the log; written in the same transaction as its read model.
CREATE TABLE kiln_projection_checkpoints (
    name       TEXT    PRIMARY KEY,
    position   BIGINT  NOT NULL,
    version    BIGINT  NOT NULL,
    updated_at TEXT    NOT NULL
);
