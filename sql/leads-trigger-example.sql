-- Example: turn changes to your `leads` table into Conversions API events, inside the same
-- transaction as the change, through capi-bridge's transactional outbox. An event is queued if
-- and only if the change commits; capi-bridge validates, hashes and delivers it.
--
-- Assumes capi-bridge runs with its default schema `capi_bridge` (DATABASE_SCHEMA) and has
-- started once (it creates capi_bridge.enqueue). Adapt the column names to your table:
--   id, email, phone, first_name, last_name, status, deal_value, updated_at.
--
--   new lead                -> Lead
--   status becomes 'booked' -> Schedule
--   status becomes 'won'    -> Purchase with value = deal_value (BRL)
--
-- Event ids are derived from the lead id, so a repeated change is a duplicate, not a second
-- conversion. `system_generated` is the action source Meta expects for CRM events.

create or replace function public.leads_to_capi_bridge() returns trigger
language plpgsql
security definer
set search_path = public
as $$
declare
    person jsonb := jsonb_strip_nulls(jsonb_build_object(
        'email', new.email,
        'phone', new.phone,
        'first_name', new.first_name,
        'last_name', new.last_name,
        'external_id', new.id::text,
        'country', 'BR',
        'action_source', 'system_generated'
    ));
begin
    if tg_op = 'INSERT' then
        perform capi_bridge.enqueue(person || jsonb_build_object(
            'event_name', 'Lead',
            'event_id', 'lead-' || new.id));
    elsif tg_op = 'UPDATE' and new.status is distinct from old.status then
        if new.status = 'booked' then
            perform capi_bridge.enqueue(person || jsonb_build_object(
                'event_name', 'Schedule',
                'event_id', 'schedule-' || new.id));
        elsif new.status = 'won' then
            perform capi_bridge.enqueue(person || jsonb_build_object(
                'event_name', 'Purchase',
                'event_id', 'purchase-' || new.id,
                'value', new.deal_value,
                'currency', 'BRL'));
        end if;
    end if;
    return new;
end;
$$;

drop trigger if exists leads_to_capi_bridge on public.leads;
create trigger leads_to_capi_bridge
    after insert or update of status on public.leads
    for each row execute function public.leads_to_capi_bridge();
