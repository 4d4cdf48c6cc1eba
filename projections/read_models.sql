-- The read models projected from the CHAT_EVT log (projection `read_models`,
-- handlers in projections/handlers.py). Everything here can be dropped and
-- rebuilt from the log with identical content: rows carry only what events
-- carry (timestamps come from event.at, never from now()).

CREATE TABLE IF NOT EXISTS conversations (
    id                 text PRIMARY KEY,
    user_id            text NOT NULL,
    project_id         text,
    title              text NOT NULL DEFAULT '',
    title_source       text,
    model              text,
    message_count      integer NOT NULL DEFAULT 0,
    token_usage_total  bigint  NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    last_seq           bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_user ON conversations (user_id, updated_at DESC);
CREATE INDEX IF NOT EXISTS conversations_by_project ON conversations (project_id, updated_at DESC);

CREATE TABLE IF NOT EXISTS messages (
    id                 text PRIMARY KEY,
    conversation_id    text NOT NULL,
    role               text NOT NULL,          -- user | assistant | system
    content            jsonb NOT NULL,         -- [{role, content}] blocks
    status             text NOT NULL,          -- complete | streaming | cancelled | failed | billing_error
    turn_id            text,
    user_message_id    text,
    parent_message_id  text,
    version_group_id   text NOT NULL,
    version_number     integer NOT NULL,
    is_latest          boolean NOT NULL,
    is_fork_origin     boolean NOT NULL DEFAULT false,
    model              text,
    model_version_id   text,
    input_tokens       integer,
    output_tokens      integer,
    tokens_estimated   boolean,
    stop_reason        text,
    error_code         text,
    error_message      text,
    seq                bigint NOT NULL,        -- position of the event that created the row
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    -- the turn's tool cards, in call order:
    -- [{id, name, arguments, raw_arguments?, result, error, duration_ms}], duration_ms null = pending
    tool_calls         jsonb NOT NULL DEFAULT '[]',
    latency_ms         integer                 -- started.at -> the turn's end event's at
);
-- Columns added after the first release: a schema made before them gets them
-- empty; `parley projections rebuild` fills them for the turns projected before.
-- Checked first, so that a start takes no lock on the table when they exist.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()
                   AND table_name = 'messages' AND column_name = 'tool_calls') THEN
        ALTER TABLE messages ADD COLUMN tool_calls jsonb NOT NULL DEFAULT '[]';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()
                   AND table_name = 'messages' AND column_name = 'latency_ms') THEN
        ALTER TABLE messages ADD COLUMN latency_ms integer;
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, seq);
CREATE INDEX IF NOT EXISTS messages_by_group ON messages (conversation_id, version_group_id);
