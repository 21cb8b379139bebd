//! Where events and the data that completes them come from, other than HTTP requests.

pub mod supabase_rest;
