-- Webhook sources (POST /v1/sources/<name>).

-- Delivery ids a sender gave (X-Chatwoot-Delivery), kept for the 48-hour dedup window: the
-- same delivery retried is acknowledged without being queued twice.
create table source_delivery (
    source text not null,
    delivery_id text not null,
    received_at bigint not null,
    primary key (source, delivery_id)
);

-- What became of each source's payloads: received, duplicate, unmatched, mapped, parked.
create table source_count (
    source text not null,
    outcome text not null,
    count bigint not null default 0,
    last_at bigint not null,
    primary key (source, outcome)
);
