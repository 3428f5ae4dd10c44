//! A deterministic mutation fuzz of the formats the server reads from the network, for plain
//! `cargo test`: the same properties as the `cargo fuzz` targets (`fuzz/properties.rs`, shared
//! with them), over seeds built here, mutated by a seeded `StdRng`.
//!
//! ```text
//!   seeds (NARs from dump_path of temp trees, rendered narinfos, path-info JSON in each form)
//!     ──► mutate: bit flips, byte and word insert/delete, length-field corruption, truncation,
//!                 splicing, duplication, dictionary tokens   (1..=4 per input, fixed seed)
//!     ──► properties::{nar_validate, narinfo_parse, path_info_json}
//! ```
//! A failure prints the iteration and the input (hex), enough to add it to `fuzz/corpus/` or a
//! unit test. The longer, coverage-guided run is `cargo fuzz` (docs/security.md).

#[path = "../fuzz/properties.rs"]
mod properties;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use stowix::nix::nar::dump_path;
use stowix::nix::{NarInfo, Sha256Hash, StorePath};

/// Mutated inputs per target: enough to reach deep mutants of every seed, and still a few
/// seconds in a debug build.
const ITERATIONS: usize = 20_000;

/// The largest single allocation `nar::validate` may make: its 128 KiB read buffer, with room
/// to spare. A length field that made it allocate what it declares would blow far past this.
const NAR_ALLOCATION_LIMIT: usize = 256 << 10;

// ---------------------------------------------------------------------------------------------
// Allocation tracking: the largest allocation request made on this thread since the last reset.
// ---------------------------------------------------------------------------------------------

struct TrackingAllocator;

thread_local! {
    // `const` and without a destructor, so it is safe to touch from inside the allocator.
    static LARGEST_ALLOCATION: Cell<usize> = const { Cell::new(0) };
}

fn note_allocation(size: usize) {
    let _ = LARGEST_ALLOCATION.try_with(|largest| {
        if size > largest.get() {
            largest.set(size);
        }
    });
}

unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

/// Runs `f` and returns the largest allocation it requested on this thread.
fn largest_allocation_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST_ALLOCATION.with(|l| l.set(0));
    let out = f();
    (out, LARGEST_ALLOCATION.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// The mutator
// ---------------------------------------------------------------------------------------------

struct Mutator {
    rng: StdRng,
    seeds: Vec<Vec<u8>>,
    /// Tokens of the format, inserted whole so mutants get past the first check.
    dictionary: Vec<Vec<u8>>,
}

/// Values a corrupted length field takes: around the real value, padding boundaries, the
/// validator's limits, and lengths that would exhaust memory if trusted.
const LENGTHS: &[u64] = &[
    0,
    1,
    7,
    8,
    9,
    13,
    32,
    33,
    255,
    256,
    4095,
    4096,
    1 << 20,
    u32::MAX as u64,
    1 << 40,
    i64::MAX as u64,
    u64::MAX - 7,
    u64::MAX,
];

impl Mutator {
    fn new(seed: u64, seeds: Vec<Vec<u8>>, dictionary: Vec<Vec<u8>>) -> Self {
        assert!(!seeds.is_empty());
        Mutator {
            rng: StdRng::seed_from_u64(seed),
            seeds,
            dictionary,
        }
    }

    /// A seed with 1..=4 mutations.
    fn next(&mut self) -> Vec<u8> {
        let mut data = self.seeds[self.rng.gen_range(0..self.seeds.len())].clone();
        for _ in 0..self.rng.gen_range(1..=4) {
            self.mutate(&mut data);
        }
        data
    }

    fn pos(&mut self, data: &[u8]) -> usize {
        self.rng.gen_range(0..=data.len())
    }

    /// An 8-byte-aligned position: NAR fields start on these.
    fn word(&mut self, data: &[u8]) -> usize {
        self.rng.gen_range(0..=data.len() / 8) * 8
    }

    fn mutate(&mut self, data: &mut Vec<u8>) {
        match self.rng.gen_range(0..11) {
            // Bit flip.
            0 if !data.is_empty() => {
                let i = self.rng.gen_range(0..data.len());
                data[i] ^= 1 << self.rng.gen_range(0..8);
            }
            // Random bytes inserted.
            1 => {
                let at = self.pos(data);
                let n = self.rng.gen_range(1..=8);
                let bytes: Vec<u8> = (0..n).map(|_| self.rng.gen()).collect();
                data.splice(at..at, bytes);
            }
            // A byte range deleted.
            2 if !data.is_empty() => {
                let at = self.rng.gen_range(0..data.len());
                let end = (at + self.rng.gen_range(1..=16)).min(data.len());
                data.drain(at..end);
            }
            // Length-field corruption: a u64 at a word boundary replaced.
            3 if data.len() >= 8 => {
                let at = self.rng.gen_range(0..data.len() / 8) * 8;
                let old = u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
                let value = match self.rng.gen_range(0..4) {
                    0 => old.wrapping_add(1),
                    1 => old.wrapping_sub(1),
                    2 => self.rng.gen(),
                    _ => LENGTHS[self.rng.gen_range(0..LENGTHS.len())],
                };
                data[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            // Truncation.
            4 => {
                let at = self.pos(data);
                data.truncate(at);
            }
            // Splice: this input's head with another seed's tail.
            5 => {
                let other = self.seeds[self.rng.gen_range(0..self.seeds.len())].clone();
                let at = self.pos(data);
                let from = self.rng.gen_range(0..=other.len());
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            // Whole words deleted or duplicated (keeps the NAR's 8-byte alignment).
            6 if data.len() >= 8 => {
                let at = self.word(data).min(data.len() - 8);
                let n = 8 * self.rng.gen_range(1..=4usize);
                let end = (at + n).min(data.len());
                if self.rng.gen() {
                    data.drain(at..end);
                } else {
                    let copy = data[at..end].to_vec();
                    data.splice(at..at, copy);
                }
            }
            // A range duplicated elsewhere.
            7 if !data.is_empty() => {
                let a = self.rng.gen_range(0..data.len());
                let b = (a + self.rng.gen_range(1..=64)).min(data.len());
                let copy = data[a..b].to_vec();
                let at = self.pos(data);
                data.splice(at..at, copy);
            }
            // A dictionary token, inserted or overwriting.
            8 | 9 if !self.dictionary.is_empty() => {
                let token = self.dictionary[self.rng.gen_range(0..self.dictionary.len())].clone();
                let at = if self.rng.gen() {
                    self.word(data)
                } else {
                    self.pos(data)
                };
                if self.rng.gen() {
                    data.splice(at..at, token);
                } else {
                    let end = (at + token.len()).min(data.len());
                    data.splice(at..end, token);
                }
            }
            // A byte set to an interesting value.
            _ if !data.is_empty() => {
                let i = self.rng.gen_range(0..data.len());
                data[i] = *[0u8, 0xff, b'\n', b' ', b':', b'/', b'.', b'"', b'0', 0x80]
                    .get(self.rng.gen_range(0..10))
                    .unwrap();
            }
            _ => data.push(self.rng.gen()),
        }
    }
}

/// Runs `check` on `ITERATIONS` mutants, printing the input of the one that fails. Returns
/// (accepted, rejected) counts.
fn fuzz(name: &str, mutator: &mut Mutator, mut check: impl FnMut(&[u8]) -> bool) -> (usize, usize) {
    let start = Instant::now();
    let (mut accepted, mut rejected) = (0, 0);
    for iteration in 0..ITERATIONS {
        let input = mutator.next();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)));
        match outcome {
            Ok(true) => accepted += 1,
            Ok(false) => rejected += 1,
            Err(panic) => {
                eprintln!(
                    "{name}: property failed at iteration {iteration} on {} bytes:\n{}\n(as text: {:?})",
                    input.len(),
                    hex(&input),
                    String::from_utf8_lossy(&input)
                );
                std::panic::resume_unwind(panic);
            }
        }
    }
    eprintln!(
        "{name}: {ITERATIONS} mutants in {:?}: {accepted} accepted, {rejected} rejected",
        start.elapsed()
    );
    (accepted, rejected)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------------

fn dump(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let summary = dump_path(path, &mut out).expect("dump_path of a seed tree");
    assert_eq!(summary.nar_size, out.len() as u64);
    out
}

/// NARs of temp trees covering every node kind and the edge cases of the format.
fn nar_seeds() -> Vec<Vec<u8>> {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name);
    let tree = p("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::create_dir(tree.join("empty-dir")).unwrap();
    for (name, contents) in [
        ("empty", &b""[..]),
        ("one", b"a"),
        ("seven", b"1234567"),
        ("eight8ch", b"12345678"),
        ("nine", b"123456789"),
        ("Zupper", b"Z"),
        ("~tilde", b"~"),
        ("sub/deeper/file", b"deep\n"),
    ] {
        std::fs::write(tree.join(name), contents).unwrap();
    }
    std::fs::write(tree.join(OsStr::from_bytes(b"\xc3\xa9")), b"e").unwrap();
    std::fs::write(tree.join(OsStr::from_bytes(b"\xff")), b"ff").unwrap();
    std::fs::write(tree.join("sub/run"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(tree.join("sub/run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(tree.join("sub/mode0655"), b"x").unwrap();
    std::fs::set_permissions(
        tree.join("sub/mode0655"),
        std::fs::Permissions::from_mode(0o655),
    )
    .unwrap();
    symlink("one", tree.join("link-relative")).unwrap();
    symlink("/nix/store", tree.join("link-absolute")).unwrap();
    symlink("/nonexistent/target", tree.join("link-dangling")).unwrap();
    std::fs::write(p("hello"), b"hello\n").unwrap();
    symlink("target", p("symlink-root")).unwrap();
    std::fs::create_dir(p("empty-root")).unwrap();
    let seeds: Vec<Vec<u8>> = [
        tree.clone(),
        tree.join("sub"),
        tree.join("empty"),
        p("hello"),
        p("symlink-root"),
        p("empty-root"),
    ]
    .iter()
    .map(|path| dump(path))
    .collect();
    // The test vectors of docs/nix-formats: `hello\n` is 120 bytes, an empty directory 96.
    assert_eq!(seeds[3].len(), 120);
    assert_eq!(seeds[5].len(), 96);
    seeds
}

/// NAR tokens as the encoder writes them (`str(s)`), for the dictionary.
fn nar_tokens() -> Vec<Vec<u8>> {
    [
        &b"nix-archive-1"[..],
        b"(",
        b")",
        b"type",
        b"regular",
        b"directory",
        b"symlink",
        b"executable",
        b"",
        b"contents",
        b"target",
        b"entry",
        b"name",
        b"node",
        b"..",
        b"a/b",
    ]
    .iter()
    .map(|s| {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(s);
        out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
        out
    })
    .collect()
}

const SELF: &str = "aydqv8w8w8z0kdv2y7cs5mxhw8j7dh98-a+b?c=d";
const DEP: &str = "0b5fk1ab0y4ahm5fqj7lp3cdq8lfpba5-glibc-2.37";
const DRV: &str = "k1zwn4cv6m7m7kclhjjbwyhl7xmk1gj0-a+b?c=d.drv";

fn store_path(basename: &str) -> StorePath {
    StorePath::from_basename(basename).unwrap()
}

fn narinfo_values() -> Vec<NarInfo> {
    let nar_hash = Sha256Hash::digest(b"nar");
    let file_hash = Sha256Hash::digest(b"file");
    let full = NarInfo {
        store_path: store_path(SELF),
        url: format!("nar/{}.nar.xz", file_hash.to_nix32()),
        compression: "xz".into(),
        file_hash: Some(file_hash),
        file_size: Some(96),
        nar_hash,
        nar_size: 120,
        references: vec![store_path(DEP), store_path(SELF)],
        deriver: Some(store_path(DRV)),
        sigs: vec![
            "cache.nixos.org-1:c2lnMQ==".into(),
            "stowix-1:c2lnMg==".into(),
        ],
        ca: Some(format!("fixed:r:sha256:{}", nar_hash.to_nix32())),
    };
    let minimal = NarInfo {
        store_path: store_path(DEP),
        url: "nar/x.nar".into(),
        compression: "none".into(),
        file_hash: None,
        file_size: None,
        nar_hash: Sha256Hash::digest(b""),
        nar_size: 1,
        references: vec![],
        deriver: None,
        sigs: vec![],
        ca: None,
    };
    vec![full, minimal]
}

fn narinfo_seeds() -> Vec<Vec<u8>> {
    let values = narinfo_values();
    let full = values[0].render();
    let mut seeds: Vec<String> = values.iter().map(NarInfo::render).collect();
    // Forms other writers produce: SRI hash, unknown keys, unknown-deriver, no final newline,
    // no Compression (bzip2), double spaces between references.
    let nar_hash = values[0].nar_hash;
    seeds.push(
        full.replace(&nar_hash.to_typed_nix32(), &nar_hash.to_sri())
            .replace("Compression: xz\n", "System: x86_64-linux\n")
            .replace(&format!("Deriver: {DRV}"), "Deriver: unknown-deriver")
            .replace(&format!("{DEP} "), &format!("{DEP}  ")),
    );
    seeds.push(full.trim_end().to_string());
    for seed in &seeds {
        NarInfo::parse(seed).unwrap_or_else(|e| panic!("seed does not parse: {e}\n{seed}"));
    }
    seeds.into_iter().map(String::into_bytes).collect()
}

fn narinfo_tokens() -> Vec<Vec<u8>> {
    [
        "StorePath: /nix/store/",
        "URL: ",
        "Compression: ",
        "FileHash: sha256:",
        "FileSize: ",
        "NarHash: sha256-",
        "NarSize: 0",
        "References: ",
        "Deriver: ",
        "Sig: ",
        "CA: ",
        "\n",
        ": ",
        " ",
        "unknown-deriver",
        SELF,
        DEP,
        "18446744073709551616",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn path_info_seeds() -> Vec<Vec<u8>> {
    let infos = narinfo_values();
    let entry = |info: &NarInfo| {
        json!({
            "narHash": info.nar_hash.to_sri(),
            "narSize": info.nar_size,
            "references": info.references.iter().map(StorePath::to_absolute).collect::<Vec<_>>(),
            "deriver": info.deriver.as_ref().map(StorePath::to_absolute),
            "ca": info.ca,
            "signatures": info.sigs,
            "registrationTime": 1700000000,
            "ultimate": false,
        })
    };
    let mut array: Vec<serde_json::Value> = infos
        .iter()
        .map(|info| {
            let mut e = entry(info);
            e["path"] = json!(info.store_path.to_absolute());
            e
        })
        .collect();
    array.push(json!({"path": format!("/nix/store/{}", "0".repeat(32) + "-gone"), "valid": false}));
    let mut object = serde_json::Map::new();
    for info in &infos {
        object.insert(info.store_path.to_absolute(), entry(info));
    }
    object.insert(format!("/nix/store/{}-gone", "1".repeat(32)), json!(null));
    let v2_info: serde_json::Map<String, serde_json::Value> = infos
        .iter()
        .map(|info| {
            let mut e = entry(info);
            e["references"] = json!(info
                .references
                .iter()
                .map(StorePath::basename)
                .collect::<Vec<_>>());
            e["deriver"] = json!(info.deriver.as_ref().map(StorePath::basename));
            e["ca"] = json!({"method": "nar", "hash": info.nar_hash.to_sri()});
            e["signatures"] = json!([{"keyName": "k-1", "sig": "c2ln"}]);
            e["narHash"] =
                json!({"algorithm": "sha256", "format": "base16", "hash": info.nar_hash.to_hex()});
            (info.store_path.basename().to_string(), e)
        })
        .chain([(format!("{}-gone", "2".repeat(32)), json!(null))])
        .collect();
    let seeds = vec![
        serde_json::Value::Array(array).to_string(),
        serde_json::Value::Object(object).to_string(),
        json!({"version": 2, "storeDir": "/nix/store", "info": v2_info}).to_string(),
    ];
    for seed in &seeds {
        let parsed = stowix::nix::path_info::parse_path_info_json(seed.as_bytes())
            .unwrap_or_else(|e| panic!("seed does not parse: {e}\n{seed}"));
        assert_eq!(parsed.valid.len(), 2, "{seed}");
        assert_eq!(parsed.invalid.len(), 1, "{seed}");
    }
    seeds.into_iter().map(String::into_bytes).collect()
}

fn json_tokens() -> Vec<Vec<u8>> {
    [
        "null",
        "{}",
        "[]",
        "\"narHash\":",
        "\"narSize\":18446744073709551615",
        "\"narSize\":-1",
        "\"valid\":false",
        "\"ca\":{\"method\":\"text\",\"hash\":\"sha256:0\"}",
        "\"sha256-\"",
        "\"sha1:",
        "\"/nix/store/",
        "\"version\":3",
        ",",
        "\"",
        "\\u0000",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

// ---------------------------------------------------------------------------------------------
// The targets
// ---------------------------------------------------------------------------------------------

#[test]
fn nar_validate_survives_mutations() {
    let seeds = nar_seeds();
    for seed in &seeds {
        assert!(properties::nar_validate(seed), "a seed NAR is rejected");
    }
    let mut mutator = Mutator::new(0x5707_1a11, seeds, nar_tokens());
    let (accepted, rejected) = fuzz("nar_validate", &mut mutator, |input| {
        let (accepted, largest) = largest_allocation_of(|| properties::nar_validate(input));
        assert!(
            largest <= NAR_ALLOCATION_LIMIT,
            "validating {} bytes allocated {largest} bytes at once",
            input.len()
        );
        accepted
    });
    // Both outcomes are reached, or the mutations do not exercise the validator.
    assert!(
        accepted > 0 && rejected > 0,
        "{accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn nar_validate_refuses_lengths_it_cannot_have_without_allocating_them() {
    // Every u64 of a real NAR set to each huge length: never allocated. (A word inside file
    // contents may be any value, so some of these stay valid NARs; the length fields do not.)
    let (mut accepted, mut rejected) = (0, 0);
    for seed in nar_seeds() {
        for at in (0..seed.len()).step_by(8) {
            for &len in &LENGTHS[12..] {
                let mut nar = seed.clone();
                nar[at..at + 8].copy_from_slice(&len.to_le_bytes());
                let (ok, largest) = largest_allocation_of(|| properties::nar_validate(&nar));
                assert!(
                    largest <= NAR_ALLOCATION_LIMIT,
                    "length {len} at {at}: allocated {largest} bytes at once"
                );
                if ok {
                    accepted += 1;
                } else {
                    rejected += 1;
                }
            }
        }
    }
    // Only words of file contents can take any value: every other word is a length or a
    // token, and corrupting it must be refused.
    assert!(
        rejected > 10 * accepted,
        "{accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn narinfo_parse_survives_mutations() {
    let seeds = narinfo_seeds();
    for seed in &seeds {
        assert!(properties::narinfo_parse(
            std::str::from_utf8(seed).unwrap()
        ));
    }
    let mut mutator = Mutator::new(0x0a1f_0000, seeds, narinfo_tokens());
    let (accepted, rejected) = fuzz("narinfo_parse", &mut mutator, |input| {
        properties::narinfo_parse(&String::from_utf8_lossy(input))
    });
    assert!(
        accepted > 0 && rejected > 0,
        "{accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn path_info_json_survives_mutations() {
    let seeds = path_info_seeds();
    for seed in &seeds {
        assert!(properties::path_info_json(seed));
    }
    let mut mutator = Mutator::new(0x09a7_b1f0, seeds, json_tokens());
    let (accepted, rejected) = fuzz("path_info_json", &mut mutator, properties::path_info_json);
    assert!(
        accepted > 0 && rejected > 0,
        "{accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn the_mutator_is_deterministic() {
    // A failure seen once must reproduce: the same seed gives the same mutants.
    let make = || Mutator::new(7, narinfo_seeds(), narinfo_tokens());
    let (mut a, mut b) = (make(), make());
    let first: Vec<Vec<u8>> = (0..200).map(|_| a.next()).collect();
    let second: Vec<Vec<u8>> = (0..200).map(|_| b.next()).collect();
    assert_eq!(first, second);
    assert!(first.iter().any(|m| !narinfo_seeds().contains(m)));
}
