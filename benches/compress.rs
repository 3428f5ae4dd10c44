//! The xz compressor pool against plain liblzma on the same bytes, at the same preset.
//!
//! Two shapes, because the pool treats them differently:
//! - many small NARs (4-64 KiB, 8 MiB in all): one thread each, dictionary sized to the NAR;
//!   the baseline is one `xz_easy_encoder` per NAR at preset 6, the way `nix copy` does it;
//! - one large NAR (32 MiB, default preset 2): liblzma's multithreaded encoder over every
//!   thread; the baseline is plain single-threaded liblzma (`benches/e2e.py` compares the
//!   end-to-end push with `xz -T<cores>` on a 2 GiB NAR).
//!
//! Data is real (host binaries and libraries), so ratios and speeds are those of store paths.

use std::io::{Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stowix::nix::path_info::PathInfo;
use stowix::nix::{Sha256Hash, StorePath};
use stowix::push::compress::{self, CompressConfig};
use stowix::push::progress::Progress;
use stowix::push::report::SilentReporter;
use stowix::push::{Health, NarStream, Piece, PIECE_SIZE};

/// Small NARs at `nix copy`'s preset, the large one at Stowix's default: at preset 6 a NAR must
/// exceed 48 MiB (two 24 MiB blocks) to go multithreaded, which would make each sample minutes.
const SMALL_PRESET: u32 = 6;
const LARGE_PRESET: u32 = 2;

fn host_bytes(total: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(total);
    for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for file in files {
            if let Ok(mut f) = std::fs::File::open(&file) {
                if f.metadata().map(|m| m.is_file()).unwrap_or(false) {
                    let _ = f.read_to_end(&mut out);
                }
            }
            if out.len() >= total {
                out.truncate(total);
                return out;
            }
        }
    }
    out
}

fn path_info(i: usize, nar_size: u64) -> Arc<PathInfo> {
    let hash = stowix::nix::base32::encode(&Sha256Hash::digest(&i.to_le_bytes()).0[..20]);
    Arc::new(PathInfo {
        path: StorePath::from_basename(&format!("{hash}-bench")).unwrap(),
        nar_hash: Sha256Hash::digest(b""),
        nar_size,
        references: Vec::new(),
        deriver: None,
        ca: None,
        signatures: Vec::new(),
    })
}

/// Runs the real compression stage over `nars` and returns the compressed byte count.
fn pool(nars: &[Bytes], level: u32, threads: u32) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (nar_tx, nar_rx) = crossbeam_channel::bounded(2);
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<stowix::push::CompressedStream>(2);
    let progress = Arc::new(Progress::new(Arc::new(SilentReporter)));
    let health = std::sync::Arc::new(Health::new(
        tokio_util::sync::CancellationToken::new(),
        std::time::Duration::from_secs(120),
    ));
    let config = CompressConfig {
        method: compress::Compression::Xz,
        level: level as i32,
        threads,
    };
    std::thread::scope(|scope| {
        scope.spawn(|| compress::run(config, nar_rx, out_tx, progress, health));
        let feeder = scope.spawn(|| {
            for (i, nar) in nars.iter().enumerate() {
                let (tx, rx) = crossbeam_channel::bounded(4);
                nar_tx
                    .send(NarStream {
                        info: path_info(i, nar.len() as u64),
                        pieces: rx,
                    })
                    .unwrap();
                for start in (0..nar.len()).step_by(PIECE_SIZE) {
                    tx.send(Piece::Data(
                        nar.slice(start..(start + PIECE_SIZE).min(nar.len())),
                    ))
                    .unwrap();
                }
                tx.send(Piece::End(Ok(()))).unwrap();
            }
            drop(nar_tx);
        });
        // Drain every compressed stream concurrently, as the uploaders would.
        let total = runtime.block_on(async {
            let mut drains = tokio::task::JoinSet::new();
            while let Some(mut stream) = out_rx.recv().await {
                drains.spawn(async move {
                    let mut bytes = 0u64;
                    while let Some(piece) = stream.pieces.recv().await {
                        match piece {
                            Piece::Data(data) => bytes += data.len() as u64,
                            Piece::End(result) => {
                                result.unwrap();
                                break;
                            }
                        }
                    }
                    bytes
                });
            }
            let mut total = 0;
            while let Some(bytes) = drains.join_next().await {
                total += bytes.unwrap();
            }
            total
        });
        feeder.join().unwrap();
        total
    })
}

fn plain_liblzma(nars: &[Bytes], level: u32) -> u64 {
    nars.iter()
        .map(|nar| {
            let mut encoder = liblzma::write::XzEncoder::new(Vec::new(), level);
            encoder.write_all(nar).unwrap();
            encoder.finish().unwrap().len() as u64
        })
        .sum()
}

fn bench(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    let data = Bytes::from(host_bytes(32 << 20));

    let mut small = Vec::new();
    let mut offset = 0usize;
    let mut size = 4 << 10;
    while offset + size <= (8 << 20).min(data.len()) {
        small.push(data.slice(offset..offset + size));
        offset += size;
        size = if size >= 64 << 10 { 4 << 10 } else { size * 2 };
    }
    let small_bytes: u64 = small.iter().map(|n| n.len() as u64).sum();
    let mut group = c.benchmark_group(format!(
        "xz preset {SMALL_PRESET}, {} small NARs",
        small.len()
    ));
    group.throughput(Throughput::Bytes(small_bytes));
    group.sample_size(10);
    group.bench_function("plain liblzma, one encoder per NAR, 1 thread", |b| {
        b.iter(|| plain_liblzma(&small, SMALL_PRESET))
    });
    group.bench_function("stowix pool, 1 thread", |b| {
        b.iter(|| pool(&small, SMALL_PRESET, 1))
    });
    group.bench_function(format!("stowix pool, {threads} threads"), |b| {
        b.iter(|| pool(&small, SMALL_PRESET, threads))
    });
    group.finish();

    let large = vec![data.clone()];
    let mut group = c.benchmark_group(format!(
        "xz preset {LARGE_PRESET}, one {} MiB NAR",
        data.len() >> 20
    ));
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(10);
    group.bench_function("plain liblzma, 1 thread", |b| {
        b.iter(|| plain_liblzma(&large, LARGE_PRESET))
    });
    group.bench_function(format!("stowix pool, {threads} threads"), |b| {
        b.iter(|| pool(&large, LARGE_PRESET, threads))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
