//! Private NATS servers for tests (to be written).
