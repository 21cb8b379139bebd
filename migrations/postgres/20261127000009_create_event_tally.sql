-- Counts kept as they change (issue 12), so /readyz, /metrics and the dashboard's overview never
-- aggregate the event table, which holds a month of delivered events. Two kinds of rows:
-- - bucket = 0: how many events of `pixel_id` are now in `state` (queued, delivered, dead,
--   dry_run);
-- - bucket > 0: the unix ms where a five-minute bucket (UTC) starts, `pixel_id` empty, and
--   `state` what happened in it: accepted (stored), delivered, dead (died, and still dead).
-- Every n is the sum over `shard`: on Postgres each connection adds to a shard of its own
-- (pg_backend_pid() % 16), so concurrent transactions of several instances never wait on one
-- hot row; SQLite has one writer and uses shard 0. The store changes these rows in the same
-- transaction as the events they count.
create table event_tally (
    bucket bigint not null,
    pixel_id text not null,
    state text not null,
    shard integer not null,
    n bigint not null,
    primary key (bucket, pixel_id, state, shard)
);

insert into event_tally (bucket, pixel_id, state, shard, n)
select 0, pixel_id, state, 0, count(*) from event group by pixel_id, state;

insert into event_tally (bucket, pixel_id, state, shard, n)
select received_at - received_at % 300000, '', 'accepted', 0, count(*) from event
where state in ('queued', 'delivered', 'dead', 'dry_run')
group by 1;

insert into event_tally (bucket, pixel_id, state, shard, n)
select delivered_at - delivered_at % 300000, '', 'delivered', 0, count(*) from event
where state = 'delivered' and delivered_at is not null
group by 1
on conflict (bucket, pixel_id, state, shard) do update set n = event_tally.n + excluded.n;

insert into event_tally (bucket, pixel_id, state, shard, n)
select updated_at - updated_at % 300000, '', 'dead', 0, count(*) from event
where state = 'dead'
group by 1
on conflict (bucket, pixel_id, state, shard) do update set n = event_tally.n + excluded.n;

-- The oldest waiting event of each pixel: one seek per pixel, bounded by what is queued.
create index event_queued_oldest on event (pixel_id, received_at) where state = 'queued';

-- Retention of parked (invalid) inbox payloads.
create index inbox_parked on inbox (updated_at) where state = 'invalid';
