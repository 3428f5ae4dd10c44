//! `nix::nar::validate` on arbitrary bytes (see `properties::nar_validate`). Run with
//! `-malloc_limit_mb=16` so a length field that made it allocate its value fails the run.
#![no_main]

#[path = "../properties.rs"]
mod properties;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    properties::nar_validate(data);
});
