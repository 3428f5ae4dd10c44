#!/usr/bin/env python3
"""Farm-scale ingest (issue 13): many `stowix nix push` runs of distinct closures into one
server at once, as a build farm's jobs do.

    python3 benches/farm.py                              # 1, 4 and 16 pushers, into docs/benchmarks.md
    python3 benches/farm.py --pushers 1,16 --reps 2 --out /tmp/farm.md
    python3 benches/farm.py --backend scaleout           # PostgreSQL + SeaweedFS behind the server

Every pusher gets a closure of its own (--small small paths of ~1 KiB and --medium paths of
~1 MiB cut from the host's binaries, with a nonce so nothing is shared), and all the pushers of
a round start together against one fresh repository. Per round:
  wall          first start to last exit; verified MiB/s of NAR and paths/s over it
  server CPU    user + system seconds of `stowix serve` (/proc/PID/stat) during the round,
                per GiB of NAR verified
  bare work     the same verification without the server: `sha256sum` of the stored files and
                `<decompress> | sha256sum` of their NARs (what the server must do at least),
                CPU seconds per GiB
  server memory peak RSS of `stowix serve` sampled every 100 ms during the round
Pushers compress with zstd by default: on one 2-core machine the clients share the cores with
the server, and cheap client compression leaves the server the CPU it would have on its own
machine (--compression xz measures the xz path, whose verification costs more).
"""

import argparse
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backends  # noqa: E402  (SeaweedFS and server start-up, admin)
import read_side  # noqa: E402  (sh)

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- farm:start -->", "<!-- farm:end -->"
sh = read_side.sh


def log(msg):
    print(f"[farm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def host_chunks(count, size):
    """`count` byte strings of `size` cut from the host's shared libraries (real machine code)."""
    libs = sorted(p for p in Path("/usr/lib/x86_64-linux-gnu").glob("*.so*") if p.is_file() and p.stat().st_size > size)
    if not libs:
        libs = sorted(p for p in Path("/usr/bin").iterdir() if p.is_file() and p.stat().st_size > size)
    rng = random.Random(7)
    out = []
    for _ in range(count):
        lib = rng.choice(libs)
        with open(lib, "rb") as f:
            f.seek(rng.randrange(0, lib.stat().st_size - size + 1))
            out.append(f.read(size))
    return out


def closures(work, count, small, medium):
    """`count` distinct closures of content-addressed paths, as lists of store paths."""
    nonce = random.getrandbits(64)
    chunks = host_chunks(count * medium, 1 << 20)
    out = []
    for c in range(count):
        src = work / f"closure-{c}"
        src.mkdir()
        files = []
        for i in range(small):
            f = src / f"s{i}"
            f.write_bytes((f"farm {nonce} closure {c} path {i} " * 40)[:700].encode() + os.urandom(324))
            files.append(str(f))
        for i in range(medium):
            f = src / f"m{i}"
            f.write_bytes(chunks[c * medium + i] + f"{nonce} {c} {i}".encode())
            files.append(str(f))
        paths = []
        for start in range(0, len(files), 500):
            paths += sh(["nix-store", "--add", *files[start:start + 500]]).split()
        out.append(paths)
    return out


def proc_stat(pid):
    """(user + system CPU seconds, resident MiB) of a process."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return cpu, rss


def nar_bytes(paths):
    total = 0
    for start in range(0, len(paths), 1000):
        out = sh(["nix-store", "--query", "--size", *paths[start:start + 1000]])
        total += sum(int(line) for line in out.split())
    return total


def bare_verification(files, compression):
    """CPU seconds of the least work that verifies `files`: hash each file, decompress it and
    hash the NAR."""
    decompress = {"zstd": "zstd -dcq", "xz": "xz -dc", "none": "cat"}[compression]
    listing = Path(tempfile.mktemp(prefix="farm-files-"))
    listing.write_text("\0".join(str(f) for f in files) + "\0")
    script = (f"xargs -0 -n 256 cat < {listing} | sha256sum > /dev/null && "
              f"xargs -0 -n 256 {decompress} < {listing} | sha256sum > /dev/null")
    before = os.times()
    subprocess.run(["/bin/sh", "-c", script], check=True)
    after = os.times()
    listing.unlink()
    return (after.children_user - before.children_user) + (after.children_system - before.children_system)


def push_round(stowix, url, token, repo, closures_of_round, compression):
    """Starts one push per closure at once; returns the wall seconds until the last exit."""
    target = f"{url}/{repo}"
    started = time.monotonic()
    procs = [subprocess.Popen([stowix, "nix", "push", "--no-progress", "--compression", compression,
                               "--target", target, "--token", token, *paths],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for paths in closures_of_round]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"a push failed ({proc.returncode}):\n{err[-2000:]}")
    return time.monotonic() - started


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stowix", default=str(ROOT / "target/release/stowix"))
    ap.add_argument("--pushers", default="1,4,16")
    ap.add_argument("--small", type=int, default=300, help="small paths per closure")
    ap.add_argument("--medium", type=int, default=8, help="~1 MiB paths per closure")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compression", default="zstd", choices=["zstd", "xz", "none"])
    ap.add_argument("--backend", default="embedded", choices=["embedded", "scaleout"])
    ap.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432")
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks.md"))
    args = ap.parse_args()
    read_side.ensure_release(args.stowix)
    counts = [int(n) for n in args.pushers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="stowix-farm-"))
    procs, database = [], None
    try:
        env = dict(os.environ)
        flags = []
        if args.backend == "scaleout":
            database = f"stowix_farm_{random.getrandbits(32):08x}"
            sh(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c", f"CREATE DATABASE {database}"])
            weed, endpoint = backends.start_seaweed(work)
            procs.append(weed)
            env.update(AWS_ACCESS_KEY_ID=backends.ACCESS_KEY, AWS_SECRET_ACCESS_KEY=backends.SECRET_KEY)
            flags = ["--database", f"{args.postgres}/{database}", "--storage", f"s3://{backends.BUCKET}/farm",
                     "--s3-endpoint", endpoint]
        data = work / "data"
        data.mkdir()
        server, url = backends.start_server(args.stowix, data, flags, env)
        procs.append(server)
        needed = sum(counts) * args.reps
        log(f"building {needed} closures of {args.small} small and {args.medium} medium paths")
        pool = closures(work, needed, args.small, args.medium)
        results = {n: [] for n in counts}
        for rep in range(args.reps):
            for n in counts:
                round_closures = [pool.pop() for _ in range(n)]
                repo = f"farm-{rep}-{n}"
                backends.admin(args.stowix, data, flags, env, "repo", "create", repo)
                token = backends.admin(args.stowix, data, flags, env, "token", "create", "--repo", repo,
                                       "--scope", "push")
                cpu_before, _ = proc_stat(server.pid)
                peak = [proc_stat(server.pid)[1]]
                stop = threading.Event()

                def sample():
                    while not stop.is_set():
                        peak[0] = max(peak[0], proc_stat(server.pid)[1])
                        time.sleep(0.1)

                sampler = threading.Thread(target=sample)
                sampler.start()
                try:
                    wall = push_round(args.stowix, url, token, repo, round_closures, args.compression)
                finally:
                    stop.set()
                    sampler.join()
                server_cpu = proc_stat(server.pid)[0] - cpu_before
                paths = [p for c in round_closures for p in c]
                nar = nar_bytes(paths)
                r = {"wall": wall, "paths": len(paths), "nar": nar, "server_cpu": server_cpu, "rss": peak[0]}
                if args.backend == "embedded":
                    stored = list((data / "store" / repo / "nar").iterdir())
                    r["bare_cpu"] = bare_verification(stored, args.compression)
                results[n].append(r)
                log(f"round {rep + 1}, {n} pushers: {len(paths)} paths, {nar / 2**20:.0f} MiB in {wall:.1f} s "
                    f"({nar / 2**20 / wall:.1f} MiB/s, {len(paths) / wall:.0f} paths/s), server {server_cpu:.1f} "
                    f"CPU s, peak RSS {peak[0]:.0f} MiB" +
                    (f", bare work {r['bare_cpu']:.1f} CPU s" if "bare_cpu" in r else ""))
        write_report(args, results)
    finally:
        backends.stop_all(procs, database)
        shutil.rmtree(work, ignore_errors=True)


def write_report(args, results):
    def med(values):
        values = sorted(values)
        m = values[len(values) // 2] if len(values) % 2 else sum(values[len(values) // 2 - 1:][:2]) / 2
        digits = 0 if m >= 100 else 1 if m >= 10 else 2
        return f"{m:.{digits}f} ({values[0]:.{digits}f}–{values[-1]:.{digits}f})"

    gib = 2**30
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    lines = [START, "",
             f"`python3 benches/farm.py --pushers {args.pushers} --small {args.small} --medium {args.medium} "
             f"--reps {args.reps} --compression {args.compression} --backend {args.backend}` on "
             f"{time.strftime('%Y-%m-%d')} at {sh(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD']).strip()}, "
             f"release build, {cpu}, {os.cpu_count()} cores, {platform.platform()}. "
             f"Medians of {args.reps} rounds (min–max).", "",
             "| pushers | paths | NAR MiB | wall s | verified MiB/s | paths/s | server CPU s per GiB | "
             "bare work CPU s per GiB | server / bare | server peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, runs in results.items():
        per_gib = [r["server_cpu"] / (r["nar"] / gib) for r in runs]
        bare = [r["bare_cpu"] / (r["nar"] / gib) for r in runs if "bare_cpu" in r]
        ratio = [r["server_cpu"] / r["bare_cpu"] for r in runs if r.get("bare_cpu")]
        lines.append(
            f"| {n} | {runs[0]['paths']} | {runs[0]['nar'] / 2**20:.0f} | {med([r['wall'] for r in runs])} | "
            f"{med([r['nar'] / 2**20 / r['wall'] for r in runs])} | {med([r['paths'] / r['wall'] for r in runs])} | "
            f"{med(per_gib)} | {med(bare) if bare else '-'} | {med(ratio) if ratio else '-'} | "
            f"{max(r['rss'] for r in runs):.0f} |")
    lines += ["", END]
    backends.write_block(Path(args.out), START, END, "Farm-scale ingest (issue 13)", "\n".join(lines))


if __name__ == "__main__":
    main()
