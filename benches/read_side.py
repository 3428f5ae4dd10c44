#!/usr/bin/env python3
"""Read-side benchmark: what every substituter costs the server. narinfo GETs (hits and misses)
and NAR GETs per second from `stowix serve`, next to nginx serving the very same files as
static files, on the same machine in the same run, under the same `wrk` load.

    python3 benches/read_side.py                       # embedded default, into docs/benchmarks.md
    python3 benches/read_side.py --reps 3 --duration 10 --out /tmp/read.md
    python3 benches/read_side.py --database postgres://... --storage s3://b/p --s3-endpoint http://...

The repository is filled by a real `stowix nix push` of `--paths` small store paths plus one
NAR of `--nar-mib` MiB; nginx gets the narinfos and NAR files fetched back from the server,
so both serve byte-identical answers. Each round runs every scenario against stowix, then
nginx, alternating, and the report quotes medians of `--reps` rounds with their spread.
"""

import argparse
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(msg):
    print(f"[read-side {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd, **kw):
    proc = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))[:200]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def wait_http(url, proc, what, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            get(url)
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer at {url}")


def start_server(stowix, work, args):
    port = free_port()
    cmd = [stowix, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(work / "data")]
    for flag in ("database", "storage", "s3_endpoint"):
        value = getattr(args, flag)
        if value:
            cmd += [f"--{flag.replace('_', '-')}", value]
    log_file = open(work / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc, "stowix serve", timeout=120)
    return proc, url, cmd[2:]


def admin(stowix, serve_args, *args):
    return sh([stowix, "admin", *[a for a in serve_args if a not in ("--listen",) and not re.match(r"127\.0\.0\.1:\d+$", a)], *args]).strip()


def fill(stowix, url, serve_args, work, paths, nar_mib):
    repo = "readbench"
    admin(stowix, serve_args, "repo", "create", repo)
    token = admin(stowix, serve_args, "token", "create", "--repo", repo, "--scope", "push")
    src = work / "src"
    src.mkdir()
    files = []
    nonce = random.getrandbits(64)
    for i in range(paths):
        f = src / f"read-{i}"
        f.write_text(f"narinfo benchmark {nonce} {i}\n")
        files.append(str(f))
    big = src / "read-big"
    big.write_bytes(os.urandom(nar_mib << 20))
    files.append(str(big))
    store_paths = []
    for start in range(0, len(files), 500):
        store_paths += sh(["nix-store", "--add", *files[start:start + 500]]).split()
    log(f"pushing {len(store_paths)} paths")
    sh([stowix, "nix", "push", "--no-progress", "--compression", "zstd", "--target", f"{url}/{repo}", "--token", token, *store_paths])
    return repo, store_paths


def mirror_for_nginx(url, repo, store_paths, root):
    """Fetches every narinfo and NAR back from the server into nginx's document root."""
    (root / repo / "nar").mkdir(parents=True)
    hashes = [Path(p).name[:32] for p in store_paths]
    big_nar = None
    for h in hashes:
        text = get(f"{url}/{repo}/{h}.narinfo")
        (root / repo / f"{h}.narinfo").write_bytes(text)
        nar_url = re.search(rb"^URL: (\S+)$", text, re.M).group(1).decode()
        size = int(re.search(rb"^FileSize: (\d+)$", text, re.M).group(1))
        if big_nar is None or size > big_nar[1]:
            big_nar = (nar_url, size)
    nar_url, size = big_nar
    (root / repo / nar_url).write_bytes(get(f"{url}/{repo}/{nar_url}"))
    return hashes, nar_url, size


def start_nginx(root, work):
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes auto;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    types {{ text/x-nix-narinfo narinfo; application/x-nix-nar xz zst; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(work), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    # The document root has no index: any HTTP answer means nginx is up.
    deadline = time.time() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError("nginx did not start: " + (work / "nginx-error.log").read_text())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, url
        except OSError:
            if time.time() > deadline:
                raise RuntimeError("nginx did not listen")
            time.sleep(0.1)


def wrk_script(work, name, paths):
    listing = work / f"{name}.paths"
    listing.write_text("\n".join(paths) + "\n")
    script = work / f"{name}.lua"
    script.write_text(f"""
local paths = {{}}
for line in io.lines("{listing}") do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
""")
    return script


def wrk(url, script, args):
    out = sh(["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{args.duration}s",
              "--latency", "-s", str(script), url])
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    unit = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[transfer.group(2)]
    p99 = re.search(r"99%\s+([\d.]+)(\w+)", out)
    p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "bytes_per_sec": float(transfer.group(1)) * unit, "p99_ms": p99_ms,
            "non2xx": int(non2xx.group(1)) if non2xx else 0}


def ensure_release(stowix):
    """Builds the release binary when the benchmark's binary does not exist yet."""
    if not Path(stowix).exists():
        log("building the release binary")
        sh(["cargo", "build", "--release", "--locked"], cwd=ROOT)


def median_spread(values):
    m = statistics.median(values)
    return m, (max(values) - min(values)) / m * 100 if m else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stowix", default=str(ROOT / "target/release/stowix"))
    ap.add_argument("--paths", type=int, default=2000)
    ap.add_argument("--nar-mib", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--database")
    ap.add_argument("--storage")
    ap.add_argument("--s3-endpoint", dest="s3_endpoint")
    ap.add_argument("--scaleout", action="store_true",
                    help="PostgreSQL (a fresh database on 127.0.0.1:5432) + SeaweedFS started here, as benches/backends.py does")
    ap.add_argument("--label", default=None, help="the report's heading [default: the backend]")
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks.md"),
                    help="the report goes between this file's read-side markers (appended if absent)")
    args = ap.parse_args()
    ensure_release(args.stowix)
    work = Path(tempfile.mkdtemp(prefix="stowix-read-"))
    # nginx's workers drop to an unprivileged user: they must be able to read the copies.
    work.chmod(0o755)
    server = nginx = weed = database = None
    if args.label is None:
        args.label = "PostgreSQL + SeaweedFS" if args.scaleout or args.database else "embedded default (SQLite + local files)"
    try:
        if args.scaleout:
            import backends  # the SeaweedFS start-up of the backends benchmark
            database = f"stowix_read_{random.getrandbits(32):08x}"
            sh(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c", f"CREATE DATABASE {database}"])
            weed, endpoint = backends.start_seaweed(work)
            os.environ.update(AWS_ACCESS_KEY_ID=backends.ACCESS_KEY, AWS_SECRET_ACCESS_KEY=backends.SECRET_KEY)
            args.database = f"postgres://postgres@127.0.0.1:5432/{database}"
            args.storage, args.s3_endpoint = f"s3://{backends.BUCKET}/read", endpoint
        server, url, serve_args = start_server(args.stowix, work, args)
        repo, store_paths = fill(args.stowix, url, serve_args, work, args.paths, args.nar_mib)
        root = work / "www"
        hashes, nar_url, nar_size = mirror_for_nginx(url, repo, store_paths, root)
        nginx, nginx_url = start_nginx(root, work)
        misses = ["".join(random.choice("0123456789abcdfghijklmnpqrsvwxyz") for _ in range(32)) for _ in range(2000)]
        scenarios = {
            "narinfo hit": wrk_script(work, "hit", [f"/{repo}/{h}.narinfo" for h in hashes]),
            "narinfo miss": wrk_script(work, "miss", [f"/{repo}/{h}.narinfo" for h in misses]),
            f"NAR GET ({nar_size >> 20} MiB)": wrk_script(work, "nar", [f"/{repo}/{nar_url}"]),
        }
        results = {name: {"stowix": [], "nginx": []} for name in scenarios}
        for rep in range(args.reps):
            for name, script in scenarios.items():
                for who, base in (("stowix", url), ("nginx", nginx_url)):
                    r = wrk(base, script, args)
                    expected_misses = name == "narinfo miss"
                    if not expected_misses and r["non2xx"]:
                        raise RuntimeError(f"{who} answered {r['non2xx']} errors for {name}")
                    results[name][who].append(r)
                    log(f"round {rep + 1} {name} {who}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms")
        write_report(args, results)
    finally:
        for proc in (server, nginx, weed):
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        if database:
            subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c",
                            f"DROP DATABASE IF EXISTS {database}"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def write_report(args, results):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    lines = [
        f"### Read side: {args.label}",
        "",
        f"`python3 benches/read_side.py --reps {args.reps} --duration {args.duration}"
        f"{' --scaleout' if args.scaleout else ''}` on {os.cpu_count()} cores "
        f"({cpu}), {platform.system()} {platform.release()}; wrk {args.threads} threads, {args.connections} "
        f"connections, {args.duration} s per run, stowix and nginx alternating; medians of {args.reps} rounds "
        f"(spread = (max - min) / median). {args.paths} narinfos, nginx serving copies of the server's own answers.",
        "",
        "| scenario | stowix req/s | nginx req/s | stowix / nginx | stowix p99 | nginx p99 | spread stowix / nginx |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by in results.items():
        s_rps, s_spread = median_spread([r["rps"] for r in by["stowix"]])
        n_rps, n_spread = median_spread([r["rps"] for r in by["nginx"]])
        s_p99 = statistics.median(r["p99_ms"] for r in by["stowix"])
        n_p99 = statistics.median(r["p99_ms"] for r in by["nginx"])
        extra = ""
        if name.startswith("NAR"):
            s_b = statistics.median(r["bytes_per_sec"] for r in by["stowix"]) / (1 << 20)
            n_b = statistics.median(r["bytes_per_sec"] for r in by["nginx"]) / (1 << 20)
            extra = f" ({s_b:.0f} vs {n_b:.0f} MiB/s)"
        lines.append(f"| {name}{extra} | {s_rps:,.0f} | {n_rps:,.0f} | {s_rps / n_rps:.2f} | {s_p99:.2f} ms | "
                     f"{n_p99:.2f} ms | {s_spread:.0f}% / {n_spread:.0f}% |")
    lines.append("")
    section = "\n".join(lines)
    # One block per backend, so both runs stay in the report.
    tag = "read-side-scaleout" if args.database else "read-side"
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    out = Path(args.out)
    text = out.read_text() if out.exists() else ""
    block = f"{start}\n{section}{end}\n"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text + ("\n" if text else "") + block
    out.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
