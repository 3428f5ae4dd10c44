//! `nix path-info --json` parsing on arbitrary bytes (see `properties::path_info_json`).
#![no_main]

#[path = "../properties.rs"]
mod properties;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    properties::path_info_json(data);
});
