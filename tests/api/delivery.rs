//! Delivery against the Graph stand-in: batching, retries, splitting, pausing, restarts.
