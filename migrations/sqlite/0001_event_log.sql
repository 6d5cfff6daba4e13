-- The append-only event log. global_position is assigned by the single writer as MAX + 1 inside
-- the append transaction, so positions are gapless and follow commit order.
--
-- `record` is the whole event as one JSON array, written once at append:
--   [position, eventId, streamId, streamVersion, eventType, schemaVersion, occurredAtUs, actor,
--    correlationId, causationId, traceparent, payload]
-- Readers concatenate records into pages instead of decoding columns row by row (replay speed);
-- the other columns exist to be indexed and filtered on.
CREATE TABLE kiln_events (
    global_position INTEGER PRIMARY KEY,
    event_id        TEXT    NOT NULL UNIQUE,
    stream_id       TEXT    NOT NULL,
    stream_version  INTEGER NOT NULL,
    event_type      TEXT    NOT NULL,
    occurred_at_us  INTEGER NOT NULL,
    recorded_at_us  INTEGER NOT NULL,
    actor           TEXT    NOT NULL,
    record          TEXT    NOT NULL,
    UNIQUE (stream_id, stream_version)
);

-- Where each projection has got to in the log; written in the same transaction as its read model.
CREATE TABLE kiln_projection_checkpoints (
    name       TEXT    PRIMARY KEY,
    position   INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    updated_at TEXT    NOT NULL
);
