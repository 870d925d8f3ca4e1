//! The conformance kit: reusable test suites a pattern author runs against
//! their pattern (feature `conformance`). See docs/writing-a-pattern.md.

pub mod kv;
pub mod pubsub;
