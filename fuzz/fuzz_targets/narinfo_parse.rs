//! `NarInfo::parse` on arbitrary text (see `properties::narinfo_parse`).
#![no_main]

#[path = "../properties.rs"]
mod properties;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Narinfos arrive as bytes; the server refuses non-UTF-8 before parsing, so the lossy
    // form only widens what the parser sees.
    properties::narinfo_parse(&String::from_utf8_lossy(data));
});
