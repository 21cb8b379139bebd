-- The operator dashboard (/admin) counts events received per time bucket and lists them by
-- time: without this index both would read the whole event table. Received times only grow,
-- so new entries land at the index's right edge.
create index event_received on event (received_at);
