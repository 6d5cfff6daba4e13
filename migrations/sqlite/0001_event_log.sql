-- The append-only event log. global_position is assigned by the single writer as MAX + 1 inside
-- the append transaction, so positions are gapless and follow commit order.
CREATE TABLE kiln_events (
    global_position INTEGER PRIMARY KEY,
    event_id        TEXT    NOT NULL UNIQUE,
    stream_id       TEXT    NOT NULL,
    stream_version  INTEGER NOT NULL,
    event_type      TEXT    NOT NULL,
    schema_version  INTEGER NOT NULL,
    occurred_at_us  INTEGER NOT NULL,
    recorded_at_us  INTEGER NOT NULL,
    actor           TEXT    NOT NULL,
    correlation_id  TEXT,
    causation_id    TEXT,
    traceparent     TEXT,
    payload         TEXT    NOT NULL,
    UNIQUE (stream_id, stream_version)
);

-- Where each projection has got to in the log; written in the same transaction as its read model.
CREATE TABLE kiln_projection_checkpoints (
    name       TEXT    PRIMARY KEY,
    position   INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    updated_at TEXT    NOT NULL
);
