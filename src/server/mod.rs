//! The repository server.
