-- Where an event came from (api, cli, sql, a source's name, site:<key>), for the dashboard's
-- search. Older rows have none. A nullable column without a default: no table rewrite.
alter table event add column source text;
