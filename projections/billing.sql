-- The billing projection (handlers in projections/billing.py): projects and
-- their members, accounts with their balances, open reservations, credit
-- grants and the ledger of charges. Like every projection, rebuilt from the log
-- with identical content (timestamps from event.at); `parley audit billing`
-- recomputes the ledger and the balances from the log and compares.

CREATE TABLE IF NOT EXISTS projects (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL,
    seq         bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS project_members (
    project_id  text NOT NULL,
    user_id     text NOT NULL,
    added_by    text,
    added_at    timestamptz NOT NULL,
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX IF NOT EXISTS project_members_by_user ON project_members (user_id);

-- balance = granted - charged (negative: debt); available = balance - reserved
CREATE TABLE IF NOT EXISTS accounts (
    account     text PRIMARY KEY,              -- user:<id> | project:<id>
    kind        text NOT NULL,
    owner       text NOT NULL,
    granted     bigint NOT NULL DEFAULT 0,     -- micro-credits
    charged     bigint NOT NULL DEFAULT 0,
    reserved    bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL,
    last_seq    bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS credit_grants (
    event_id    text PRIMARY KEY,
    account     text NOT NULL,
    amount      bigint NOT NULL,
    note        text NOT NULL,
    granted_by  text NOT NULL,
    granted_at  timestamptz NOT NULL,
    seq         bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS reservations (
    turn_id          text PRIMARY KEY,
    account          text NOT NULL,
    conversation_id  text NOT NULL,
    amount           bigint NOT NULL,
    reserved_at      timestamptz NOT NULL,
    seq              bigint NOT NULL
);

-- One row per billed turn: its charge, at the prices its `started` recorded.
CREATE TABLE IF NOT EXISTS ledger (
    turn_id           text PRIMARY KEY,
    account           text NOT NULL,           -- who paid
    conversation_id   text NOT NULL,
    project_id        text,
    user_id           text NOT NULL,           -- who asked
    input_tokens      bigint NOT NULL,
    output_tokens     bigint NOT NULL,
    input_price       double precision NOT NULL,  -- credits per million tokens
    output_price      double precision NOT NULL,
    tokens_estimated  boolean NOT NULL,
    cost              bigint NOT NULL,         -- micro-credits
    reserved          bigint NOT NULL,         -- what the pre-flight held
    debt              bigint NOT NULL,         -- the part of the cost the balance did not cover
    turn_end          text NOT NULL,           -- done | cancelled | failed
    charged_at        timestamptz NOT NULL,
    seq               bigint NOT NULL
);
-- The whole ledger in log order (an admin's unfiltered page): without it every
-- page was a scan and sort of the table. Added after the first release; the first
-- process of a version with it builds it (README, "Postgres and Redis").
CREATE INDEX IF NOT EXISTS ledger_by_seq ON ledger (seq);
CREATE INDEX IF NOT EXISTS ledger_by_account ON ledger (account, seq);
CREATE INDEX IF NOT EXISTS ledger_by_project ON ledger (project_id, seq);
CREATE INDEX IF NOT EXISTS ledger_by_user ON ledger (user_id, seq);
CREATE INDEX IF NOT EXISTS ledger_by_conversation ON ledger (conversation_id, seq);
