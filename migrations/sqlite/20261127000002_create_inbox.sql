-- Raw events waiting to be validated and stored (see migrations/postgres for the transactional
-- outbox that fills it there). An application sharing this SQLite file may insert rows itself.
-- Rows are deleted once their events are stored; invalid ones stay with their problems.
create table inbox (
    id integer primary key,
    source text not null,
    -- JSON: one event object, an array of events, or Meta's {"data": [...]} envelope.
    payload text not null,
    -- pending | invalid
    state text not null default 'pending',
    problems text,
    leased_until integer,
    created_at integer not null,
    updated_at integer not null
);

-- Workers take pending rows oldest first.
create index inbox_pending on inbox (id) where state = 'pending';
