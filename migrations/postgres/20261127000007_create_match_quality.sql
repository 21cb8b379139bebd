-- Runs with search_path set to capi-bridge's own schema (see 20261127000001).

-- Match quality (issue 6): per UTC day, pixel and event name, how many events were stored, how
-- many carried each match key, and how many had it filled in by the match-key memory. Counts
-- only: no values. Added up in memory and written once a second.
create table match_quality (
    day bigint not null, -- days since 1970-01-01 (UTC)
    pixel_id text not null,
    event_name text not null,
    events bigint not null default 0,
    em bigint not null default 0,
    ph bigint not null default 0,
    fn_ln bigint not null default 0,
    external_id bigint not null default 0,
    fbc bigint not null default 0,
    fbp bigint not null default 0,
    ip bigint not null default 0,
    user_agent bigint not null default 0,
    lead_id bigint not null default 0,
    filled_em bigint not null default 0,
    filled_ph bigint not null default 0,
    filled_fn_ln bigint not null default 0,
    filled_external_id bigint not null default 0,
    filled_fbc bigint not null default 0,
    filled_fbp bigint not null default 0,
    filled_ip bigint not null default 0,
    filled_user_agent bigint not null default 0,
    filled_lead_id bigint not null default 0,
    primary key (day, pixel_id, event_name)
);

-- Values the normalizer dropped from accepted events, by field (Meta's key, or 'unknown' for
-- names the sender chose) and reason. Never the value.
create table match_quality_drop (
    day bigint not null,
    pixel_id text not null,
    event_name text not null,
    field text not null,
    reason text not null,
    count bigint not null default 0,
    primary key (day, pixel_id, event_name, field, reason)
);
