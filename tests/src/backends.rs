//! Private Redis and PostgreSQL servers for tests (to be written).
