-- Configuration tables: what operators configure (models, their versions and
-- prices, loaded from PARLEY_MODELS_FILE), not what the log says. They are the
-- one exception to "every table can be rebuilt from the log" (DESIGN section 1):
-- no projection owns them, so `parley projections rebuild` never drops, moves or
-- rewrites them. Projection tables must not hold foreign keys into them: a
-- rebuild builds its tables in a schema of their own first.
--
-- (models and model_versions go here.)

CREATE TABLE IF NOT EXISTS models (
    name               text PRIMARY KEY,        -- what clients send as `model`
    base_url           text,
    max_output_tokens  integer,
    is_default         boolean NOT NULL DEFAULT false   -- the model a conversation gets unasked
);

CREATE TABLE IF NOT EXISTS model_versions (
    model         text NOT NULL,
    version       text NOT NULL,
    status        text NOT NULL,                -- active | deprecated
    is_default    boolean NOT NULL,
    release_date  date,
    input_price   double precision NOT NULL,    -- credits per million tokens
    output_price  double precision NOT NULL,
    PRIMARY KEY (model, version)
);
