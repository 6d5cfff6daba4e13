-- Per-actor request limits shared by every API replica (services/store/src/limits.rs).
-- `tat` is the actor's GCRA theoretical arrival time and `expires_at` a slot's lease end, both in
-- seconds since the epoch by the database's clock; `in_flight` counts the actor's slot rows.
CREATE TABLE kiln_actor_limits (
    actor     TEXT PRIMARY KEY,
    tat       REAL NOT NULL,
    in_flight INTEGER NOT NULL DEFAULT 0
);

-- One row per request in flight; a replica that dies leaves its rows to expire.
CREATE TABLE kiln_actor_slots (
    slot_id    TEXT PRIMARY KEY,
    actor      TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX kiln_actor_slots_actor ON kiln_actor_slots (actor, expires_at);
