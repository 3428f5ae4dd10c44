//! `stowix::nix` checked against real Nix, the oracle for every format: NAR bytes against
//! `nix-store --dump`, hashes against `nix-hash` and `nix path-info --json`, narinfo rendering
//! against the narinfo files `nix copy --to file://` writes, and keys and signatures against
//! `nix key` / `nix store sign` / `nix store verify` / `nix copy --from` with `require-sigs`.
//!
//! Needs `nix-store` and `nix` (2.8 or later) on PATH with a writable local store (root, no
//! daemon, as on CI). Without them every test fails with a message saying so.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use stowix::nix::nar::{dump_path, validate, NarSummary};
use stowix::nix::narinfo::NarInfo;
use stowix::nix::path_info::{parse_path_info_json, PathInfo};
use stowix::nix::signing::{PublicKey, SecretKey};
use stowix::nix::{Sha256Hash, StorePath};

// ---------------------------------------------------------------------------------------------
// Running Nix

/// Fails the test (not skips it) when Nix is missing: a silent pass would hide that the formats
/// were never checked.
fn require_nix() {
    for tool in ["nix-store", "nix"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "`{tool}` is not on PATH: tests/nix_formats.rs checks the Nix formats against real \
             Nix and cannot run without it (install it with `apt-get install nix-bin`)"
        );
    }
}

fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    // No substituters: tests must not wait on cache.nixos.org, which is unreachable offline.
    cmd.args(["--option", "substituters", ""]);
    cmd
}

/// `nix` with the new-style commands enabled (experimental in 2.8).
fn nix() -> Command {
    let mut cmd = command("nix");
    cmd.args(["--extra-experimental-features", "nix-command"]);
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed with {}:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(cmd: &mut Command) -> Vec<u8> {
    run(cmd).stdout
}

fn stdout_line(cmd: &mut Command) -> String {
    String::from_utf8(stdout(cmd)).unwrap().trim().to_owned()
}

/// A string no earlier run used, so each run builds fresh store paths (signatures added by
/// `nix store sign` would otherwise pile up in the store database across runs).
fn nonce() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

/// Builds an input-addressed closure: `top` refers to itself and to `dep`. Such paths are
/// only accepted from a cache with a valid signature, unlike `nix-store --add` ones.
fn build_closure(dir: &Path) -> (StorePath, StorePath) {
    let nix_file = dir.join("closure.nix");
    fs::write(
        &nix_file,
        format!(
            r#"let
              dep = derivation {{
                name = "dep"; system = builtins.currentSystem; builder = "/bin/sh";
                args = [ "-c" "echo {nonce} > $out" ];
              }};
            in derivation {{
              name = "top+x?y=z"; system = builtins.currentSystem; builder = "/bin/sh";
              args = [ "-c" "echo ${{dep}} $out > $out" ];
            }}"#,
            nonce = nonce()
        ),
    )
    .unwrap();
    let top = stdout_line(command("nix-build").arg(&nix_file).arg("--no-out-link"));
    let top = StorePath::from_absolute(&top).unwrap();
    let info = path_info(&[top.to_absolute()]);
    let dep = info.valid[0]
        .references
        .iter()
        .find(|r| **r != top)
        .expect("top refers to dep")
        .clone();
    (top, dep)
}

fn path_info(paths: &[String]) -> stowix::nix::path_info::PathInfoOutput {
    let json = stdout(nix().args(["path-info", "--json", "--sigs"]).args(paths));
    parse_path_info_json(&json)
        .unwrap_or_else(|e| panic!("{e}\n{}", String::from_utf8_lossy(&json)))
}

fn add_to_store(path: &Path) -> StorePath {
    StorePath::from_absolute(&stdout_line(command("nix-store").arg("--add").arg(path))).unwrap()
}

// ---------------------------------------------------------------------------------------------
// NAR

/// Every NAR edge case from the reference, as separate roots and as one tree.
struct Fixture {
    _dir: tempfile::TempDir,
    tree: PathBuf,
    roots: Vec<PathBuf>,
}

fn write_mode(path: &Path, contents: &[u8], mode: u32) {
    fs::write(path, contents).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Deterministic bytes that do not compress or repeat with a short period.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect()
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    let t = |name: &str| tree.join(name);

    for (name, len) in [("f0", 0), ("f1", 1), ("f7", 7), ("f8", 8), ("f9", 9)] {
        fs::write(t(name), pseudo_random(len)).unwrap();
    }
    fs::write(t("big"), pseudo_random(3 * 1024 * 1024 + 5)).unwrap();
    fs::create_dir(t("empty-dir")).unwrap();
    fs::create_dir_all(t("nested/empty")).unwrap();
    fs::write(t("nested/file"), b"nested\n").unwrap();
    // Names whose lengths are multiples of 8 need no padding.
    fs::write(t("12345678"), b"8").unwrap();
    fs::write(t("1234567812345678"), b"16").unwrap();
    // Byte order: uppercase < lowercase < `~` < UTF-8 and other high bytes.
    for name in [
        "Upper", "upper", "Z", "a", "~tilde", "café", "_", "-dash", ".hidden",
    ] {
        fs::write(t(name), name.as_bytes()).unwrap();
    }
    for name in [&b"\xff\xfe-not-utf8"[..], b"latin1-\xe9", b"\x01control"] {
        fs::write(tree.join(OsStr::from_bytes(name)), name).unwrap();
    }
    // Only the owner's execute bit makes a file executable.
    write_mode(&t("mode0655"), b"#!/bin/sh\n", 0o655);
    write_mode(&t("mode0755"), b"#!/bin/sh\n", 0o755);
    write_mode(&t("mode0700"), b"x", 0o700);
    write_mode(&t("mode0444"), b"ro", 0o444);
    symlink("does/not/exist", t("dangling")).unwrap();
    symlink("/etc/passwd", t("absolute")).unwrap();
    symlink("f1", t("relative")).unwrap();
    symlink("nested", t("to-dir")).unwrap();
    symlink(OsStr::from_bytes(b"\xff-target"), t("non-utf8-target")).unwrap();
    let mut deep = t("deep");
    for level in 0..40 {
        deep.push(format!("level{level}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom"), b"bottom\n").unwrap();
    fs::create_dir(t("many")).unwrap();
    for i in 0..2000 {
        fs::write(t("many").join(format!("entry-{i}")), i.to_string()).unwrap();
    }

    let root = |name: &str| dir.path().join(name);
    fs::write(root("root-file"), b"hello\n").unwrap();
    fs::write(root("root-empty-file"), b"").unwrap();
    fs::create_dir(root("root-empty-dir")).unwrap();
    symlink("target", root("root-symlink")).unwrap();
    symlink("/nonexistent/absolute", root("root-dangling-symlink")).unwrap();
    write_mode(&root("root-executable"), b"a", 0o755);
    let mut roots: Vec<PathBuf> = [
        "root-file",
        "root-empty-file",
        "root-empty-dir",
        "root-symlink",
        "root-dangling-symlink",
        "root-executable",
    ]
    .iter()
    .map(|name| root(name))
    .collect();
    roots.extend(["f0", "f9", "big", "mode0655", "nested", "deep", "many"].map(t));
    roots.push(tree.clone());
    Fixture {
        _dir: dir,
        tree,
        roots,
    }
}

fn dump(path: &Path) -> (Vec<u8>, NarSummary) {
    let mut nar = Vec::new();
    let summary = dump_path(path, &mut nar).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (nar, summary)
}

/// Equal bytes, reported as the first difference rather than megabytes of output.
fn assert_same_bytes(ours: &[u8], nix: &[u8], what: &Path) {
    if let Some(at) = ours.iter().zip(nix).position(|(a, b)| a != b) {
        let window = |b: &[u8]| b[at.saturating_sub(16)..(at + 16).min(b.len())].to_vec();
        panic!(
            "{}: NAR differs from nix-store --dump at byte {at}:\n ours {:?}\n  nix {:?}",
            what.display(),
            window(ours).escape_ascii().to_string(),
            window(nix).escape_ascii().to_string()
        );
    }
    assert_eq!(
        ours.len(),
        nix.len(),
        "{}: NAR length differs",
        what.display()
    );
}

#[test]
fn dump_path_is_byte_identical_to_nix_store_dump() {
    require_nix();
    let fixture = fixture();
    for root in &fixture.roots {
        let nix_nar = stdout(Command::new("nix-store").arg("--dump").arg(root));
        let (ours, summary) = dump(root);
        assert_same_bytes(&ours, &nix_nar, root);
        assert_eq!(summary.nar_size, nix_nar.len() as u64);
        assert_eq!(summary.nar_hash, Sha256Hash::digest(&nix_nar));
        // nix-hash computes the NAR hash itself and prints it in nixbase32: an independent
        // check of both the hash and our nixbase32.
        let nix_hash = stdout_line(
            Command::new("nix-hash")
                .args(["--type", "sha256", "--base32"])
                .arg(root),
        );
        assert_eq!(summary.nar_hash.to_nix32(), nix_hash, "{}", root.display());
        assert_eq!(
            validate(nix_nar.as_slice()).unwrap_or_else(|e| panic!("{}: {e}", root.display())),
            summary
        );
    }
}

#[test]
fn validate_streams_nix_store_dump_output() {
    require_nix();
    let fixture = fixture();
    let mut child = Command::new("nix-store")
        .arg("--dump")
        .arg(&fixture.tree)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let summary = validate(child.stdout.take().unwrap()).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(summary, dump(&fixture.tree).1);
    let sha256sum = stdout_line(Command::new("sh").arg("-c").arg(format!(
        "nix-store --dump '{}' | sha256sum",
        fixture.tree.display()
    )));
    assert_eq!(
        sha256sum.split_whitespace().next(),
        Some(summary.nar_hash.to_hex().as_str())
    );
}

/// `nix-store --add` copies a path into the store; its narHash in `nix path-info --json` (SRI)
/// and `nix-store -q --hash` (`sha256:<nix32>`) must equal what we compute from the original.
#[test]
fn nar_hash_matches_nix_path_info_of_added_paths() {
    require_nix();
    let dir = tempfile::tempdir().unwrap();
    let n = nonce();
    let file = dir.path().join(format!("file-{n}"));
    fs::write(&file, format!("file {n}\n")).unwrap();
    let tree = dir.path().join(format!("tree+a?b=c-{n}"));
    fs::create_dir_all(tree.join("sub/empty")).unwrap();
    write_mode(&tree.join("sub/run"), n.as_bytes(), 0o755);
    symlink("sub/run", tree.join("link")).unwrap();
    let link = dir.path().join(format!("symlink-{n}"));
    symlink(format!("/dangling/{n}"), &link).unwrap();

    let sources = [file, tree, link];
    let added: Vec<StorePath> = sources.iter().map(|s| add_to_store(s)).collect();
    let missing = "/nix/store/00000000000000000000000000000000-not-there".to_string();
    let mut query: Vec<String> = added.iter().map(StorePath::to_absolute).collect();
    query.push(missing.clone());
    let out = path_info(&query);
    assert_eq!(out.invalid, [missing]);
    assert_eq!(out.valid.len(), sources.len());

    for (source, store_path) in sources.iter().zip(&added) {
        let (_, ours) = dump(source);
        let info: &PathInfo = out.valid.iter().find(|i| i.path == *store_path).unwrap();
        assert_eq!(info.nar_hash, ours.nar_hash, "{store_path}");
        assert_eq!(info.nar_size, ours.nar_size, "{store_path}");
        assert_eq!(
            info.ca.as_deref(),
            Some(format!("fixed:r:{}", ours.nar_hash.to_typed_nix32()).as_str()),
            "nix-store --add makes content-addressed paths"
        );
        assert!(info.references.is_empty());
        let typed = stdout_line(
            command("nix-store")
                .args(["-q", "--hash"])
                .arg(store_path.to_absolute()),
        );
        assert_eq!(Sha256Hash::parse(&typed).unwrap(), ours.nar_hash);
        assert_eq!(typed, ours.nar_hash.to_typed_nix32());
        let size = stdout_line(
            command("nix-store")
                .args(["-q", "--size"])
                .arg(store_path.to_absolute()),
        );
        assert_eq!(size, ours.nar_size.to_string());
        // The store copy dumps to the same NAR as the original.
        assert_eq!(dump(Path::new(&store_path.to_absolute())).1, ours);
    }
}

// ---------------------------------------------------------------------------------------------
// narinfo, keys, signatures

#[test]
fn keys_made_by_nix_parse_and_sign_exactly_like_nix() {
    require_nix();
    let dir = tempfile::tempdir().unwrap();
    let secret_text = stdout_line(nix().args(["key", "generate-secret", "--key-name", "test-1"]));
    let secret_file = dir.path().join("secret");
    fs::write(&secret_file, &secret_text).unwrap();
    let public_text = stdout_line(
        nix()
            .args(["key", "convert-secret-to-public"])
            .stdin(fs::File::open(&secret_file).unwrap()),
    );

    let secret = SecretKey::parse(&secret_text).unwrap();
    let public = PublicKey::parse(&public_text).unwrap();
    assert_eq!(secret.name(), "test-1");
    assert_eq!(secret.to_text(), secret_text);
    assert_eq!(public.to_text(), public_text);
    assert_eq!(secret.public_key(), public);

    // Nix signs an input-addressed path with self- and other references; Ed25519 is
    // deterministic, so our signature of our fingerprint must be the very same string.
    let (top, dep) = build_closure(dir.path());
    run(nix()
        .args(["store", "sign", "--key-file"])
        .arg(&secret_file)
        .arg(top.to_absolute()));
    let info = path_info(&[top.to_absolute()]).valid.remove(0);
    assert_eq!(info.references, {
        let mut refs = vec![top.clone(), dep];
        refs.sort();
        refs
    });
    assert!(info
        .deriver
        .as_ref()
        .is_some_and(|d| d.name().ends_with(".drv")));
    let [nix_sig] = info.signatures.as_slice() else {
        panic!("expected one signature, got {:?}", info.signatures)
    };
    assert_eq!(&secret.sign(&info.fingerprint()), nix_sig);
    assert!(public.verify(&info.fingerprint(), nix_sig));
}

#[test]
fn nix_accepts_our_keys() {
    require_nix();
    let dir = tempfile::tempdir().unwrap();
    let ours = SecretKey::generate("stowix-test-1");
    let secret_file = dir.path().join("secret");
    fs::write(&secret_file, ours.to_text()).unwrap();
    let (top, _) = build_closure(dir.path());

    // Nix reads our secret key file...
    run(nix()
        .args(["store", "sign", "--key-file"])
        .arg(&secret_file)
        .arg(top.to_absolute()));
    let info = path_info(&[top.to_absolute()]).valid.remove(0);
    assert_eq!(info.signatures, [ours.sign(&info.fingerprint())]);
    // ...and our public key text, counting the signature as valid. `--sigs-needed 1` makes
    // the locally built ("ultimately trusted") path need a signature all the same.
    let verify = |trusted: &str| {
        nix()
            .args(["store", "verify", "--no-contents", "--sigs-needed", "1"])
            .args(["--option", "trusted-public-keys", trusted])
            .arg(top.to_absolute())
            .output()
            .unwrap()
    };
    let ok = verify(&ours.public_key().to_text());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let other = SecretKey::generate("stowix-test-1").public_key().to_text();
    assert!(
        !verify(&other).status.success(),
        "a different key must not verify"
    );
}

/// `nix copy --to file://` writes narinfo files: ours must parse them, render them back byte
/// for byte, and agree on the fingerprint Nix signed. Then narinfo files we render and sign
/// must be accepted by `nix copy --from` with `require-sigs`.
#[test]
fn narinfo_round_trips_through_nix_binary_cache() {
    require_nix();
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("stowix-cache-1");
    let key_file = dir.path().join("secret");
    fs::write(&key_file, key.to_text()).unwrap();
    let (top, dep) = build_closure(dir.path());
    let ca_source = dir.path().join(format!("ca-{}", nonce()));
    fs::write(&ca_source, b"content-addressed\n").unwrap();
    let ca_path = add_to_store(&ca_source);

    let cache = dir.path().join("cache");
    let cache_url = format!("file://{}", cache.display());
    run(nix()
        .arg("copy")
        .arg("--to")
        .arg(format!("{cache_url}?secret-key={}", key_file.display()))
        .arg(top.to_absolute())
        .arg(ca_path.to_absolute()));

    let infos = path_info(&[top.to_absolute(), dep.to_absolute(), ca_path.to_absolute()]);
    assert_eq!(infos.valid.len(), 3);
    for info in &infos.valid {
        let file = cache.join(format!("{}.narinfo", info.path.hash_part()));
        let text = fs::read_to_string(&file).unwrap();
        let narinfo = NarInfo::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(narinfo.render(), text, "render differs from Nix's narinfo");
        assert_eq!(narinfo.store_path, info.path);
        assert_eq!(narinfo.nar_hash, info.nar_hash);
        assert_eq!(narinfo.nar_size, info.nar_size);
        assert_eq!(narinfo.references, info.references);
        assert_eq!(narinfo.deriver, info.deriver);
        assert_eq!(narinfo.ca, info.ca, "CA carried verbatim");
        assert_eq!(narinfo.compression, "xz");
        assert_eq!(narinfo.fingerprint(), info.fingerprint());
        assert_eq!(narinfo.sigs, [key.sign(&narinfo.fingerprint())]);
        assert!(key
            .public_key()
            .verify(&narinfo.fingerprint(), &narinfo.sigs[0]));
        let nar_file = cache.join(&narinfo.url);
        assert_eq!(
            fs::metadata(&nar_file).unwrap().len(),
            narinfo.file_size.unwrap()
        );
        assert_eq!(
            Some(Sha256Hash::digest(&fs::read(&nar_file).unwrap())),
            narinfo.file_hash
        );
    }
    let ca_info = NarInfo::parse(
        &fs::read_to_string(cache.join(format!("{}.narinfo", ca_path.hash_part()))).unwrap(),
    )
    .unwrap();
    assert!(ca_info
        .ca
        .as_deref()
        .is_some_and(|ca| ca.starts_with("fixed:r:sha256:")));
    assert!(ca_info
        .render()
        .ends_with(&format!("CA: {}\n", ca_info.ca.as_ref().unwrap())));

    // Re-sign every narinfo with a second key of ours and render it ourselves.
    let resign_key = SecretKey::generate("stowix-cache-2");
    for entry in fs::read_dir(&cache).unwrap() {
        let path = entry.unwrap().path();
        if path.extension() != Some(OsStr::new("narinfo")) {
            continue;
        }
        let mut narinfo = NarInfo::parse(&fs::read_to_string(&path).unwrap()).unwrap();
        narinfo.sigs = vec![resign_key.sign(&narinfo.fingerprint())];
        fs::write(&path, narinfo.render()).unwrap();
    }
    let copy_from_cache = |trusted: &PublicKey, store: &Path| {
        nix()
            .args(["copy", "--from", &cache_url, "--to"])
            .arg(store)
            .args(["--option", "trusted-public-keys", &trusted.to_text()])
            .args(["--option", "require-sigs", "true"])
            .args(["--option", "narinfo-cache-negative-ttl", "0"])
            .arg(top.to_absolute())
            .output()
            .unwrap()
    };
    let wrong = copy_from_cache(&key.public_key(), &dir.path().join("store-wrong-key"));
    assert!(!wrong.status.success(), "the old signatures were replaced");
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("lacks a valid signature"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    let store = dir.path().join("store");
    let right = copy_from_cache(&resign_key.public_key(), &store);
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    let copied = store.join(top.to_absolute().trim_start_matches('/'));
    let top_info = infos.valid.iter().find(|i| i.path == top).unwrap();
    assert_eq!(dump(&copied).1.nar_hash, top_info.nar_hash);
}

/// A > 4 GiB file needs u64 lengths and streaming. Ignored by default because it reads
/// 4.1 GiB several times (a minute or so); the file is sparse, so it takes no disk space.
/// Run with `cargo test --test nix_formats -- --ignored`.
#[test]
#[ignore = "reads 4.1 GiB several times; run with --ignored"]
fn file_over_4_gib_streams_and_matches_nix() {
    require_nix();
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge");
    let size = 4 * 1024 * 1024 * 1024 + 100 * 1024 * 1024 + 3;
    let mut file = fs::File::create(&path).unwrap();
    file.write_all(b"head").unwrap();
    file.seek(SeekFrom::Start(size - 4)).unwrap();
    file.write_all(b"tail").unwrap();
    drop(file);
    assert_eq!(fs::metadata(&path).unwrap().len(), size);

    let ours = dump_path(&path, std::io::sink()).unwrap();
    assert_eq!(ours.nar_size, 24 + 16 * 4 + 8 + size + 5 + 16);
    let sha256sum = stdout_line(
        Command::new("sh")
            .arg("-c")
            .arg(format!("nix-store --dump '{}' | sha256sum", path.display())),
    );
    assert_eq!(
        sha256sum.split_whitespace().next(),
        Some(ours.nar_hash.to_hex().as_str())
    );

    let mut child = Command::new("nix-store")
        .arg("--dump")
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    assert_eq!(validate(&mut stdout).unwrap(), ours);
    assert_eq!(stdout.read(&mut [0; 1]).unwrap(), 0);
    assert!(child.wait().unwrap().success());
}
