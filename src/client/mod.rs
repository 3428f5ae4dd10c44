//! HTTP client for the push API.
