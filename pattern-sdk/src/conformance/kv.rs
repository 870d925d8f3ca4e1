//! Key-value conformance suite (to be written).
