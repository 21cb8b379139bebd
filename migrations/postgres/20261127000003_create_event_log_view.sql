-- The stable interface for the user's own tools (a CRM dashboard reading Supabase): columns
-- are only ever added to this view, never renamed or removed. Hashed values only; the
-- tables behind it may change between versions.
create view event_log as
select
    e.event_id,
    e.event_name,
    e.pixel_id,
    case
        when e.state = 'queued' and e.leased_until is not null then 'delivering'
        when e.state = 'queued' and e.attempts > 0 and e.last_error is not null then 'failed'
        else e.state
    end as status,
    e.attempts,
    e.last_error,
    to_timestamp(e.received_at / 1000.0) as received_at,
    to_timestamp(e.updated_at / 1000.0) as updated_at,
    to_timestamp(e.delivered_at / 1000.0) as delivered_at,
    e.test_event_code
from event as e;

-- Payloads the database queued that break a rule, with the reason (replay with
-- `capi-bridge replay --inbox` after fixing them).
create view inbox_problems as
select id, source, payload, problems, to_timestamp(updated_at / 1000.0) as updated_at
from inbox
where state = 'invalid';
