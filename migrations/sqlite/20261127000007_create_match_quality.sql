-- Match quality (issue 6): per UTC day, pixel and event name, how many events were stored, how
-- many carried each match key, and how many had it filled in by the match-key memory. Counts
-- only: no values. Added up in memory and written once a second.
create table match_quality (
    day integer not null, -- days since 1970-01-01 (UTC)
    pixel_id text not null,
    event_name text not null,
    events integer not null default 0,
    em integer not null default 0,
    ph integer not null default 0,
    fn_ln integer not null default 0,
    external_id integer not null default 0,
    fbc integer not null default 0,
    fbp integer not null default 0,
    ip integer not null default 0,
    user_agent integer not null default 0,
    lead_id integer not null default 0,
    filled_em integer not null default 0,
    filled_ph integer not null default 0,
    filled_fn_ln integer not null default 0,
    filled_external_id integer not null default 0,
    filled_fbc integer not null default 0,
    filled_fbp integer not null default 0,
    filled_ip integer not null default 0,
    filled_user_agent integer not null default 0,
    filled_lead_id integer not null default 0,
    primary key (day, pixel_id, event_name)
);

-- Values the normalizer dropped from accepted events, by field (Meta's key, or 'unknown' for
-- names the sender chose) and reason. Never the value.
create table match_quality_drop (
    day integer not null,
    pixel_id text not null,
    event_name text not null,
    field text not null,
    reason text not null,
    count integer not null default 0,
    primary key (day, pixel_id, event_name, field, reason)
);
