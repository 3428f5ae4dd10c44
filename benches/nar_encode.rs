//! NAR encoder throughput against plainly reading the same files: how much the encoding and
//! hashing cost on top of the I/O any pusher must do.
//!
//! The corpus is ~64 MiB copied from the host's libraries and binaries into a temporary tree,
//! warm in the page cache after the first iteration, so both sides measure CPU, not disk.

use std::io::Read;
use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stowix::nix::nar::dump_path;

const CORPUS_BYTES: u64 = 64 << 20;

fn build_corpus(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut index = 0usize;
    for source in ["/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib"] {
        let Ok(entries) = std::fs::read_dir(source) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for file in files {
            let Ok(meta) = std::fs::symlink_metadata(&file) else {
                continue;
            };
            if !meta.is_file() || meta.len() > 8 << 20 {
                continue;
            }
            let sub = dir.join(format!("d{}", index % 16));
            std::fs::create_dir_all(&sub).unwrap();
            if std::fs::copy(&file, sub.join(format!("f{index}"))).is_ok() {
                total += meta.len();
                index += 1;
            }
            if total >= CORPUS_BYTES {
                return total;
            }
        }
    }
    total
}

fn read_all(dir: &Path, buf: &mut [u8]) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            total += read_all(&path, buf);
        } else {
            let mut file = std::fs::File::open(&path).unwrap();
            loop {
                let n = file.read(buf).unwrap();
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
        }
    }
    total
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("corpus");
    let bytes = build_corpus(&root);
    let mut group = c.benchmark_group("nar_encode");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(10);
    let mut buf = vec![0u8; 256 << 10];
    group.bench_function("read files (baseline)", |b| {
        b.iter(|| read_all(&root, &mut buf))
    });
    group.bench_function("dump_path (NAR + sha256)", |b| {
        b.iter(|| dump_path(&root, std::io::sink()).unwrap().nar_size)
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
