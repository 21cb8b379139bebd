-- While writes are failing (a full disk, a broken connection), /readyz proves recovery with one
-- small committed write here rather than trusting a read: a store that can be read but not
-- written is not ready. One row, rewritten in place.
create table write_probe (
    id integer primary key check (id = 1),
    written_at bigint not null
);
