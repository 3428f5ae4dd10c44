//! The push pipeline.
