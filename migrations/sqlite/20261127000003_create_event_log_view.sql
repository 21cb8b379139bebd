-- The stable interface for other tools reading this file: columns are only ever added to this
-- view, never renamed or removed. Hashed values only. Times are unix milliseconds.
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
    e.received_at,
    e.updated_at,
    e.delivered_at,
    e.test_event_code
from event as e;

-- Queued payloads that break a rule, with the reason.
create view inbox_problems as
select id, source, payload, problems, updated_at
from inbox
where state = 'invalid';
