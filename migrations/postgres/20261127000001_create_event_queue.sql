-- Runs with search_path set to capi-bridge's own schema (DATABASE_SCHEMA, default capi_bridge),
-- so the names below land there; the application itself always qualifies them with the schema.

-- One row per accepted event and its place in the delivery queue: "stored" and "queued" are
-- one fact. The payload lives in event_payload so that the queue updates (claim, settle) rewrite
-- narrow rows only (every update writes a new row version in Postgres).
create table event (
    -- Assigned by the database; insert_events maps the returned ids back to its input by the
    -- dedup key, which is unique among the new events of one call.
    id bigint generated always as identity primary key,
    pixel_id text not null,
    event_id text not null,
    event_name text not null,
    test_event_code text,
    -- queued | delivered | dead | dry_run ("delivering" is a queued row with a live lease).
    state text not null,
    attempts integer not null default 0,
    -- Unix milliseconds, so the same SQL works on SQLite and Postgres.
    next_attempt_at bigint not null,
    leased_until bigint,
    -- Meta refuses events older than 7 days (62 for physical_store): retries stop here.
    deadline_at bigint not null,
    last_error text,
    received_at bigint not null,
    updated_at bigint not null,
    delivered_at bigint,
    -- Meta's trace id of the delivering request. The successful attempt lives here rather than
    -- in `attempt`, so delivering an event costs one row write, not two.
    delivered_fbtrace_id text
);

-- The data[i] object sent to Meta, as JSON text (hashed values only), written once. Text, not
-- jsonb: it is sent byte for byte as it was built, never queried inside.
create table event_payload (
    event_row_id bigint primary key references event (id) on delete cascade,
    payload text not null
);

-- Workers look for due, unleased events of one pixel, oldest first (claims lock them with
-- for update skip locked, so several instances walk this index without waiting on each other).
-- `id` breaks ties in the claim order, as SQLite's implicit rowid does.
create index event_due on event (pixel_id, next_attempt_at, id) where state = 'queued';
-- GET /v1/events/{event_id}.
create index event_by_event_id on event (event_id);
-- Replay and retention of dead letters.
create index event_dead on event (updated_at) where state = 'dead';
-- Retention of delivered and dry-run events.
create index event_delivered on event (delivered_at) where state = 'delivered';
create index event_dry_run on event (received_at) where state = 'dry_run';

-- Every unsuccessful Graph request an event took part in, with Meta's answer.
create table attempt (
    id bigint generated always as identity primary key,
    event_row_id bigint not null references event (id) on delete cascade,
    attempted_at bigint not null,
    -- delivered | retry | rejected | paused | split
    outcome text not null,
    http_status integer,
    code bigint,
    subcode bigint,
    fbtrace_id text,
    error_title text,
    error_message text
);
-- find_event lists an event's attempts; deleting an event cascades to them through it.
create index attempt_by_event on attempt (event_row_id);

-- The (pixel, event_name, event_id) keys seen in the last 48 hours, Meta's dedup window:
-- a webhook redelivery is acknowledged as a duplicate and not queued again. The primary key is
-- what makes deduplication hold across several instances on one database.
create table dedup_key (
    pixel_id text not null,
    event_name text not null,
    event_id text not null,
    first_seen_at bigint not null,
    primary key (pixel_id, event_name, event_id)
);
