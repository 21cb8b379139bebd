//! Crash safety: kill -9 while accepting and delivering; every acknowledged event still arrives.
