pub mod supabase_rest;
