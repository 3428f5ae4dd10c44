//! Decompression bombs against the real server, through all three upload routes (`POST nars`,
//! chunked `uploads/{id}/complete`, `nix copy`'s `PUT nar/<file>`), for xz and zstd:
//!
//! ```text
//!   NAR of 512 MiB of zeros ──► xz / zstd (~80 KB / ~16 KB) ──► header patched to claim a huge
//!   dictionary or window (xz) ──► upload ──► answer code, server peak RSS (VmHWM in /proc),
//!                                            NAR bytes decompressed (/metrics)
//! ```
//! The bombs are built in memory in well under a second, so each test stays quick.

mod common;

use std::io::Write as _;
use std::sync::OnceLock;

use common::*;
use stowix::api::{self, codes};

/// NAR bytes inside every bomb: large enough that decoding all of it shows in memory and in
/// the decompressed-bytes counter, small enough to build quickly.
const BOMB_NAR_ZEROS: u64 = 512 << 20;
/// Peak RSS growth allowed while bombs are refused. A refused bomb costs the decoder's
/// bookkeeping and at most one read buffer of output; an unbounded one costs the whole
/// 512 MiB (xz with a 4 GiB dictionary) or a 128 MiB window (zstd), per upload.
const RSS_GROWTH_BOUND: u64 = 96 << 20;
/// Output a refused upload may produce past its limit: the NAR validator's 128 KiB read, and
/// a decoder's internal block, with room to spare.
const OVERRUN_SLACK: f64 = (1 << 20) as f64;
const DECOMPRESSED: &str = "stowix_server_verified_nar_bytes_total";

/// `nix-archive-1` framing of one regular file holding `len` zeros, streamed into `out`.
fn write_zero_nar(out: &mut impl std::io::Write, len: u64) {
    fn s(out: &mut impl std::io::Write, text: &[u8]) {
        out.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
        out.write_all(text).unwrap();
        let pad = (8 - text.len() % 8) % 8;
        out.write_all(&[0u8; 8][..pad]).unwrap();
    }
    for token in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
    ] {
        s(out, token);
    }
    out.write_all(&len.to_le_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        out.write_all(&zeros[..n]).unwrap();
        left -= n as u64;
    }
    let pad = ((8 - len % 8) % 8) as usize;
    out.write_all(&[0u8; 8][..pad]).unwrap();
    s(out, b")");
}

/// The size of [`write_zero_nar`]'s output.
fn zero_nar_size(len: u64) -> u64 {
    let mut counter = CountingWriter(0);
    write_zero_nar(&mut counter, 0);
    counter.0 + len.div_ceil(8) * 8
}

struct CountingWriter(u64);
impl std::io::Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The zero NAR as xz (preset 0, its 256 KiB dictionary), as any encoder would write it.
fn xz_bomb() -> &'static [u8] {
    static BOMB: OnceLock<Vec<u8>> = OnceLock::new();
    BOMB.get_or_init(|| {
        let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 0);
        write_zero_nar(&mut enc, BOMB_NAR_ZEROS);
        enc.finish().unwrap()
    })
}

/// The zero NAR as zstd (level 1), streamed so the frame carries a window descriptor.
fn zstd_bomb() -> &'static [u8] {
    static BOMB: OnceLock<Vec<u8>> = OnceLock::new();
    BOMB.get_or_init(|| {
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        write_zero_nar(&mut enc, BOMB_NAR_ZEROS);
        enc.finish().unwrap()
    })
}

/// IEEE CRC-32, as the xz block header carries it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// `xz` with the LZMA2 dictionary-size byte of its first block set to `dict_byte` (40 claims
/// 4 GiB, 28 is 64 MiB, 29 is 96 MiB) and the block header's CRC-32 fixed, so only the
/// decoder's memory limit can refuse it.
fn with_xz_dict(xz: &[u8], dict_byte: u8) -> Vec<u8> {
    let mut out = xz.to_vec();
    let header = 12;
    let size = (usize::from(out[header]) + 1) * 4;
    let flags = out[header + 1];
    assert_eq!(flags & 0x03, 0, "expected one filter (LZMA2 alone)");
    assert_eq!(flags & 0xC0, 0, "expected no sizes in the block header");
    // Filter flags: id 0x21 (LZMA2), one property byte, the dictionary byte.
    assert_eq!(&out[header + 2..header + 4], &[0x21, 0x01]);
    out[header + 4] = dict_byte;
    let crc = crc32(&out[header..header + size - 4]);
    out[header + size - 4..header + size].copy_from_slice(&crc.to_le_bytes());
    out
}

/// `zstd` with its frame's window descriptor set to 2^`window_log`.
fn with_zstd_window(zstd: &[u8], window_log: u8) -> Vec<u8> {
    let mut out = zstd.to_vec();
    assert_eq!(&out[..4], &[0x28, 0xB5, 0x2F, 0xFD], "zstd magic");
    let descriptor = out[4];
    assert_eq!(
        descriptor & 0x20,
        0,
        "expected a window descriptor (no single segment)"
    );
    assert_eq!(descriptor & 0x03, 0, "expected no dictionary id");
    out[5] = (window_log - 10) << 3;
    out
}

/// Peak resident memory of a process so far (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib * 1024
}

struct Target {
    server: TestServer,
    url: String,
    token: String,
}

impl Target {
    async fn start(config: &str) -> Self {
        let server = TestServer::start_with_config(config);
        let repo = unique_name("bombs");
        server.create_repo(&repo, false);
        let token = server.create_token(&repo, "push");
        let url = server.repo_url(&repo);
        // One request of each kind first, so the baseline includes the server's warm-up.
        repo_info(&url, &token).await;
        Target { server, url, token }
    }

    fn peak_rss(&self) -> u64 {
        peak_rss(self.server.pid().expect("server runs"))
    }

    async fn decompressed(&self) -> f64 {
        self.server.metric(DECOMPRESSED).await
    }
}

fn suffix(compression: &str) -> &'static str {
    match compression {
        "xz" => "xz",
        "zstd" => "zst",
        _ => unreachable!(),
    }
}

/// `POST api/v1/nars` of `file` declaring `nar_size`; returns (status, code).
async fn via_post(t: &Target, file: &[u8], compression: &str, nar_size: u64) -> (u16, String) {
    let params = api::NarUploadParams {
        // Any well-formed NarHash: decoding stops long before it could be compared.
        nar_hash: sha256_nix32(b"not the NAR"),
        nar_size,
        compression: compression.to_string(),
        file_hash: sha256_nix32(file),
        file_size: file.len() as u64,
    };
    let (status, err) = api_error(post_nar(&t.url, &t.token, &params, file.to_vec()).await).await;
    (status, err.code)
}

/// A chunked upload of `file` declaring `nar_size`, sent in one chunk; returns the
/// completion's (status, code).
async fn via_chunks(t: &Target, file: &[u8], compression: &str, nar_size: u64) -> (u16, String) {
    let create = api::CreateUpload {
        nar_hash: sha256_nix32(format!("bomb {}", nonce()).as_bytes()),
        nar_size,
        compression: compression.to_string(),
        encoder: "bomb".to_string(),
    };
    let state = create_upload(&t.url, &t.token, &create).await;
    let resp = patch_chunk(&t.url, &t.token, &state.upload_id, 0, file.to_vec()).await;
    let _: api::UploadState = parse_ok(resp, "PATCH the bomb").await;
    let complete = api::CompleteUpload {
        file_hash: sha256_nix32(file),
        file_size: file.len() as u64,
    };
    let resp = complete_upload(&t.url, &t.token, &state.upload_id, &complete).await;
    let (status, err) = api_error(resp).await;
    (status, err.code)
}

/// `nix copy`'s `PUT nar/<file hash>.nar.<ext>`, which declares no NarSize; returns
/// (status, code).
async fn via_put(t: &Target, file: &[u8], compression: &str) -> (u16, String) {
    let name = format!(
        "{}.nar.{}",
        sha256_nix32(file).trim_start_matches("sha256:"),
        suffix(compression)
    );
    let resp = http()
        .put(format!("{}/nar/{name}", t.url))
        .header("Authorization", basic(&t.token))
        .body(file.to_vec())
        .send()
        .await
        .expect("PUT nar");
    let (status, err) = api_error(resp).await;
    (status, err.code)
}

#[tokio::test]
async fn xz_dictionary_claiming_4_gib_is_refused_before_decoding_on_every_route() {
    let t = Target::start("").await;
    let bomb = with_xz_dict(xz_bomb(), 40);
    let honest = zero_nar_size(BOMB_NAR_ZEROS);
    let (rss_before, decompressed_before) = (t.peak_rss(), t.decompressed().await);
    // Four at once on each route, as the attack did; every one declares the true NarSize, so
    // only the memory limit stands between the header and a 4 GiB dictionary.
    let mut answers = Vec::new();
    for round in futures_util::future::join_all((0..4).map(|_| async {
        (
            via_post(&t, &bomb, "xz", honest).await,
            via_chunks(&t, &bomb, "xz", honest).await,
            via_put(&t, &bomb, "xz").await,
        )
    }))
    .await
    {
        answers.extend([round.0, round.1, round.2]);
    }
    for answer in &answers {
        assert_eq!(
            answer,
            &(422, codes::DECOMPRESSION_LIMIT.to_string()),
            "{answers:?}"
        );
    }
    let growth = t.peak_rss().saturating_sub(rss_before);
    let decompressed = t.decompressed().await - decompressed_before;
    eprintln!("12 xz bombs (4 GiB dictionary): peak RSS +{growth} bytes, {decompressed} NAR bytes decoded");
    assert!(
        growth < RSS_GROWTH_BOUND,
        "peak RSS grew by {growth} bytes (bound {RSS_GROWTH_BOUND})"
    );
    assert_eq!(decompressed, 0.0, "nothing may be decoded past the header");
}

#[tokio::test]
async fn decompression_stops_just_past_the_declared_nar_size() {
    let t = Target::start("").await;
    // Legitimate headers this time (xz's 256 KiB dictionary; zstd's window raised to the
    // 128 MiB the server allows): only the declared NarSize stops them.
    let zstd = with_zstd_window(zstd_bomb(), 27);
    let (rss_before, decompressed_before) = (t.peak_rss(), t.decompressed().await);
    const SMALL: u64 = 100;
    // Over the compressed file, so the chunked route accepts the file's bytes.
    const CHUNKED: u64 = 1 << 20;
    let (a, b, c, d) = tokio::join!(
        via_post(&t, xz_bomb(), "xz", SMALL),
        via_post(&t, &zstd, "zstd", SMALL),
        via_chunks(&t, xz_bomb(), "xz", CHUNKED),
        via_chunks(&t, &zstd, "zstd", CHUNKED),
    );
    for answer in [&a, &b, &c, &d] {
        assert_eq!(
            answer,
            &(422, codes::NAR_SIZE_MISMATCH.to_string()),
            "{:?}",
            [&a, &b, &c, &d]
        );
    }
    let growth = t.peak_rss().saturating_sub(rss_before);
    let decompressed = t.decompressed().await - decompressed_before;
    let bound = (2 * SMALL + 2 * CHUNKED) as f64 + 4.0 * OVERRUN_SLACK;
    eprintln!(
        "4 bombs with a declared NarSize: peak RSS +{growth} bytes, {decompressed} NAR bytes decoded (bound {bound})"
    );
    assert!(
        decompressed <= bound,
        "{decompressed} NAR bytes decoded, more than the declared sizes allow ({bound})"
    );
    assert!(
        growth < RSS_GROWTH_BOUND,
        "peak RSS grew by {growth} bytes (bound {RSS_GROWTH_BOUND})"
    );
}

#[tokio::test]
async fn put_nar_with_no_declared_size_stops_at_max_nar_bytes() {
    const CAP: u64 = 16 << 20;
    let t = Target::start(&format!("max_nar_bytes = {CAP}\n")).await;
    let zstd = with_zstd_window(zstd_bomb(), 27);
    let (rss_before, decompressed_before) = (t.peak_rss(), t.decompressed().await);
    let (a, b) = tokio::join!(via_put(&t, xz_bomb(), "xz"), via_put(&t, &zstd, "zstd"));
    for answer in [&a, &b] {
        assert_eq!(
            answer,
            &(413, codes::PAYLOAD_TOO_LARGE.to_string()),
            "{a:?} {b:?}"
        );
    }
    let growth = t.peak_rss().saturating_sub(rss_before);
    let decompressed = t.decompressed().await - decompressed_before;
    let bound = 2.0 * (CAP as f64 + OVERRUN_SLACK);
    eprintln!(
        "2 bombs by PUT nar/: peak RSS +{growth} bytes, {decompressed} NAR bytes decoded (bound {bound})"
    );
    assert!(
        decompressed <= bound,
        "{decompressed} NAR bytes decoded, more than max_nar_bytes allows ({bound})"
    );
    assert!(
        growth < RSS_GROWTH_BOUND + 2 * CAP,
        "peak RSS grew by {growth} bytes"
    );

    // A declared NarSize over the cap is refused before the body is read, on both routes that
    // declare one.
    let (status, code) = via_post(&t, xz_bomb(), "xz", CAP + 1).await;
    assert_eq!((status, code.as_str()), (413, codes::PAYLOAD_TOO_LARGE));
    let create = api::CreateUpload {
        nar_hash: sha256_nix32(b"too big"),
        nar_size: CAP + 1,
        compression: "xz".into(),
        encoder: "bomb".into(),
    };
    let (status, err) = api_error(post_create_upload(&t.url, &t.token, &create).await).await;
    assert_eq!(
        (status, err.code.as_str()),
        (413, codes::PAYLOAD_TOO_LARGE),
        "{err:?}"
    );
}

/// The memory limit admits what xz's presets write (up to the 64 MiB dictionary of -9) and
/// refuses the next dictionary size LZMA2 can declare; zstd's window stops at 128 MiB.
#[tokio::test]
async fn decoder_limits_admit_every_preset_and_refuse_the_next_size() {
    let t = Target::start("").await;
    let path = LocalPath::load(&build_text("preset9", &nonce()));
    let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 9);
    enc.write_all(&path.nar).unwrap();
    let preset9 = enc.finish().unwrap();
    let params = |file: &[u8]| api::NarUploadParams {
        nar_hash: path.nar_hash.clone(),
        nar_size: path.nar_size(),
        compression: "xz".into(),
        file_hash: sha256_nix32(file),
        file_size: file.len() as u64,
    };
    let over = with_xz_dict(&preset9, 29);
    let (status, err) =
        api_error(post_nar(&t.url, &t.token, &params(&over), over.clone()).await).await;
    assert_eq!(
        (status, err.code.as_str()),
        (422, codes::DECOMPRESSION_LIMIT),
        "96 MiB dictionary: {err:?}"
    );
    assert!(err.message.contains("memory"), "{err:?}");
    assert_eq!(
        with_xz_dict(&preset9, 28),
        preset9,
        "xz -9 declares a 64 MiB dictionary"
    );
    let resp = post_nar(&t.url, &t.token, &params(&preset9), preset9.clone()).await;
    let _: api::NarStored = parse_ok(resp, "POST an xz -9 NAR").await;

    let window = with_zstd_window(zstd_bomb(), 28);
    let (status, code) = via_post(&t, &window, "zstd", zero_nar_size(BOMB_NAR_ZEROS)).await;
    assert_eq!(
        (status, code.as_str()),
        (422, codes::DECOMPRESSION_LIMIT),
        "256 MiB window"
    );
}
