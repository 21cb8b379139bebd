-- Runs with search_path set to capi-bridge's own schema (see 20261127000001).

-- Match-key memory (issue 4): per person identity and user_data field, the newest value seen, so
-- that a later event about the same person lacking it (a CRM Purchase days after a landing-page
-- Lead) can be completed. Hashed customer information and browser identifiers (fbc, fbp, IP
-- address, user agent) only, never a raw email, phone number or name: see domain::match_keys.
-- Several instances write it at once: an upsert keeps the row with the newest seen_at, so they
-- merge instead of overwriting each other.
create table match_key (
    -- x:<hashed external_id> | l:<lead_id> | e:<hashed email>
    identity text not null,
    -- Meta's user_data key: em, ph, fn, …, external_id, lead_id, fbc, fbp, client_ip_address,
    -- client_user_agent.
    field text not null,
    -- The value as sent to Meta, as JSON text (hashed keys as an array of hashes).
    value text not null,
    -- Unix ms: event_time of the event it came from. A value never replaces a newer one.
    seen_at bigint not null,
    -- Unix ms after which it is no longer used (MATCH_KEY_MEMORY_DAYS after seen_at; an fbc at
    -- most 90 days after its click); pruned then.
    expires_at bigint not null,
    primary key (identity, field)
);

-- Pruning of expired values.
create index match_key_expiry on match_key (expires_at);
