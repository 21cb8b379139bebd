-- The transactional outbox: events a user's own transaction hands to capi-bridge with
-- enqueue(). A row exists if and only if that transaction committed. capi-bridge takes pending
-- rows, runs them through exactly the same validation, normalization and hashing as HTTP events,
-- and deletes them once the events are stored; a row that fails validation stays here as
-- `invalid` with its problems, visible and replayable after a fix.
create table inbox (
    id bigint generated always as identity primary key,
    -- Who queued it: 'sql' for enqueue().
    source text not null,
    -- One event object, an array of events, or Meta's {"data": [...]} envelope.
    payload jsonb not null,
    -- pending | invalid
    state text not null default 'pending',
    -- For invalid rows: [{"event_index", "field", "reason"}, ...].
    problems jsonb,
    -- Unix ms; a worker owns a pending row until then.
    leased_until bigint,
    created_at bigint not null,
    updated_at bigint not null
);

-- Workers take pending rows oldest first.
create index inbox_pending on inbox (id) where state = 'pending';

-- Queues an event inside the caller's transaction. Call it from a trigger or your application:
--   select capi_bridge.enqueue('{"event_name": "Lead", "email": "a@example.com"}'::jsonb);
-- The event is delivered if and only if the transaction commits. Returns the inbox row id;
-- events without an event_id get "inbox-<id>" (stable across retries, so never sent twice).
-- `set search_path from current` pins the function to this schema whatever the caller's path.
create function enqueue(event jsonb) returns bigint
language plpgsql
set search_path from current
as $$
declare
    new_id bigint;
    now_ms bigint := (extract(epoch from clock_timestamp()) * 1000)::bigint;
begin
    if event is null or jsonb_typeof(event) not in ('object', 'array') then
        raise exception 'capi_bridge.enqueue expects a JSON object or array, got %',
            coalesce(jsonb_typeof(event), 'null');
    end if;
    insert into inbox (source, payload, created_at, updated_at)
    values ('sql', event, now_ms, now_ms)
    returning id into new_id;
    -- Delivered at commit (and not at all on rollback): wakes an idle capi-bridge at once.
    perform pg_notify('capi_bridge_inbox_' || current_schema(), '');
    return new_id;
end;
$$;
