-- Each projection's own bookkeeping, one row set per projection name. Part of
-- the projection: a rebuild replaces a projection's rows here with the ones it
-- built (projections/rebuild.py), never another projection's.

CREATE TABLE IF NOT EXISTS projection_checkpoints (
    name      text PRIMARY KEY,
    position  bigint NOT NULL            -- the last CHAT_EVT sequence applied
);

-- Events a projection could not apply as written, and what it did instead
-- (`sanitised`: stored with NUL and lone surrogates replaced by U+FFFD;
-- `skipped`: not applied).
CREATE TABLE IF NOT EXISTS projection_errors (
    projection       text NOT NULL,
    seq              bigint NOT NULL,          -- the event's position in CHAT_EVT
    conversation_id  text,
    event_type       text NOT NULL,
    rule             text NOT NULL,            -- sanitised | skipped
    reason           text NOT NULL,
    raw              bytea,                    -- the event as written
    PRIMARY KEY (projection, seq)
);

-- The projections stopped for a log that ends before their checkpoint (rule
-- log_behind, projections/projector.py): /readyz asks on every probe, and the
-- table may hold a row for every event a projection could not apply.
CREATE INDEX IF NOT EXISTS projection_errors_log_behind
    ON projection_errors (projection, seq) WHERE rule = 'log_behind';
