//! Pub/sub conformance suite (to be written).
