//! Several instances on one Postgres: the work is split, nothing lost, nothing sent twice beyond crash retries.
