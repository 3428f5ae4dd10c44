#!/usr/bin/env python3
"""End-to-end benchmark: `stowix nix push` against `nix copy --to` on the same closures, the same
server and the same xz preset, alternating and repeated, in one run.

    python3 benches/e2e.py                 # all corpora, 3 repetitions, writes docs/benchmarks.md
    python3 benches/e2e.py --corpora small --reps 5 --out /tmp/bench.md

For each corpus it builds the store paths with real Nix, starts one real `stowix serve`, and
pushes each corpus into a fresh repository per run and pusher. Each run is measured with
/usr/bin/time (wall, user+sys CPU, peak RSS); bytes sent come from the server's
`stowix_server_upload_received_bytes_total`; compressed size is the sum of the stored NAR files.
A sample of every run's paths is substituted back with `nix copy --from`, signatures required.
Warm runs push again into the repositories that already hold everything.
"""

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NIX = ["nix", "--extra-experimental-features", "nix-command"]
# The builds are local; an unreachable cache.nixos.org would add seconds of retries per call.
NO_SUBST = ["--option", "substituters", ""]


def sh(cmd, **kw):
    proc = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)[:200]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- corpora


def host_files(min_size, max_size, limit):
    """Real binaries, libraries and text from the host's installed packages."""
    picked = []
    for top in ["/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib", "/usr/share/doc", "/usr/share/perl", "/usr/libexec"]:
        for dirpath, _, names in os.walk(top):
            for name in sorted(names):
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p, follow_symlinks=False)
                except OSError:
                    continue
                if os.path.islink(p) or not os.path.isfile(p) or not os.access(p, os.R_OK):
                    continue
                # The names go into a shell command line in the derivation.
                if not re.fullmatch(r"[A-Za-z0-9._+/-]+", p):
                    continue
                if min_size <= st.st_size <= max_size:
                    picked.append((p, st.st_size))
    random.Random(42).shuffle(picked)
    return picked[:limit]


def build_nix(expr_file, work):
    out = sh(["nix-build", str(expr_file), "--no-out-link", "--max-jobs", "2", *NO_SUBST], cwd=work)
    return [line for line in out.split() if line.startswith("/nix/store/")]


def corpus_realistic(work, nonce, paths=300, target_mib=250):
    """A DAG of `paths` derivations holding real host files, ~target_mib MiB of NAR."""
    files = host_files(2 << 10, 6 << 20, 20000)
    budget = target_mib << 20
    groups, current, size = [], [], 0
    per_path = budget // paths
    for path, fsize in files:
        current.append(path)
        size += fsize
        if size >= per_path:
            groups.append(current)
            current, size = [], 0
            if len(groups) == paths:
                break
    lines = ["let", "  mk = name: deps: files: derivation {", "    inherit name; system = builtins.currentSystem;",
             '    builder = "/bin/sh"; nonce = "%s";' % nonce,
             '    args = [ "-c" ("/bin/mkdir -p $out/files && /bin/cp --backup=numbered " + files + " $out/files/ && /bin/echo " + deps + " > $out/deps") ];',
             "  };"]
    rng = random.Random(7)
    for i, group in enumerate(groups):
        deps = [f"p{j}" for j in rng.sample(range(i), min(i, rng.randint(0, 4)))] if i else []
        dep_str = " ".join("${" + d + "}" for d in deps)
        quoted = " ".join(group)
        lines.append(f'  p{i} = mk "bench-real-{i}" "{dep_str}" "{quoted}";')
    lines.append("in [ " + " ".join(f"p{i}" for i in range(len(groups))) + " ]")
    expr = work / "realistic.nix"
    expr.write_text("\n".join(lines) + "\n")
    return build_nix(expr, work)


def corpus_small(work, nonce, count=10000):
    """`count` content-addressed paths of ~1 KiB each (`nix-store --add`, 10k in seconds)."""
    src = work / "small"
    src.mkdir(exist_ok=True)
    rng = random.Random(3)
    names = []
    for i in range(count):
        p = src / f"s{i}"
        # Half text, half random: 1 KiB each, unique per run thanks to the nonce.
        body = (f"{nonce} {i} " * 60)[:700].encode() + rng.randbytes(324)
        p.write_bytes(body)
        names.append(str(p))
    out = []
    for i in range(0, len(names), 2000):
        out += sh(["nix-store", "--add", *names[i:i + 2000]]).split()
    return out


def corpus_huge(work, nonce, gib=2):
    """One NAR of `gib` GiB, half incompressible (urandom), half compressible text."""
    half_mib = gib * 512
    script = (f"/usr/bin/head -c {half_mib}M /dev/urandom > $out.r && "
              f"/usr/bin/yes 'stowix benchmark line {nonce} with some repetitive text' | /usr/bin/head -c {half_mib}M > $out.t && "
              "/bin/mkdir $out && /bin/mv $out.r $out/random && /bin/mv $out.t $out/text")
    expr = work / "huge.nix"
    expr.write_text('derivation { name = "bench-huge"; system = builtins.currentSystem; builder = "/bin/sh"; '
                    f'args = [ "-c" "{script}" ]; }}\n')
    return build_nix(expr, work)


def closure_of(paths):
    out = sh(["nix-store", "-qR", *paths])
    return out.split()


def nar_bytes(paths):
    info = json.loads(sh([*NIX, "path-info", "--json", *paths]))
    return sum(entry["narSize"] for entry in info)


# ---------------------------------------------------------------- server


class Server:
    def __init__(self, stowix, work):
        self.stowix, self.data = stowix, work / "server-data"
        self.out = open(work / "serve.out", "w+")
        self.err = open(work / "serve.log", "w")
        self.proc = subprocess.Popen([stowix, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(self.data)],
                                     stdout=self.out, stderr=self.err)
        for _ in range(200):
            self.out.seek(0)
            line = self.out.readline()
            if line.startswith("listening on "):
                self.url = line.split()[-1]
                return
            time.sleep(0.05)
        raise RuntimeError("stowix serve did not start")

    def admin(self, *args):
        return sh([self.stowix, "admin", "--data-dir", str(self.data), *args]).strip()

    def new_repo(self, name):
        key = self.admin("repo", "create", name)
        token = self.admin("token", "create", "--repo", name, "--scope", "push")
        return key, token

    def received_bytes(self):
        text = urllib.request.urlopen(self.url + "/metrics").read().decode()
        m = re.search(r"^stowix_server_upload_received_bytes_total(?:\{\})? (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def cpu_seconds(self):
        """User + system CPU seconds the server has used so far (/proc/PID/stat)."""
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stored_bytes(self, repo):
        nar_dir = self.data / "store" / repo / "nar"
        return sum(f.stat().st_size for f in nar_dir.iterdir()) if nar_dir.exists() else 0

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------- runs


def timed(cmd, env, sampler=None):
    """Runs cmd under /usr/bin/time; returns wall s, cpu s, peak RSS MiB (and samples)."""
    fmt = "STOWIXBENCH %e %U %S %M"
    samples = []
    stop = threading.Event()

    def sample():
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - t0, sampler()))
            time.sleep(0.1)

    thread = threading.Thread(target=sample) if sampler else None
    if thread:
        thread.start()
    proc = subprocess.run(["/usr/bin/time", "-f", fmt, *cmd], env=env, text=True, capture_output=True)
    stop.set()
    if thread:
        thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [l for l in proc.stderr.splitlines() if l.startswith("STOWIXBENCH ")][-1].split()
    wall, user, system, rss_kib = float(line[1]), float(line[2]), float(line[3]), int(line[4])
    return {"wall": wall, "cpu": user + system, "rss_mib": rss_kib / 1024, "samples": samples}


def push_stowix(stowix, server, repo, token, roots, level, work):
    env = dict(os.environ, STOWIX_TARGET=f"{server.url}/{repo}", STOWIX_TOKEN=token)
    cmd = [stowix, "nix", "push", "--no-progress"]
    # "default+nobatch": every NAR in a request of its own, to measure what batching buys.
    if level is not None and str(level).endswith("+nobatch"):
        level = str(level).removesuffix("+nobatch")
        cmd.append("--no-batch")
    if level is not None:
        # "zstd:3" is a method and its level, "6" an xz preset.
        method, _, number = str(level).rpartition(":")
        if method:
            cmd += ["--compression", method]
        if number != "default":
            cmd += ["--compression-level", number]
    if len(roots) > 200:
        listing = work / f"roots-{repo}.txt"
        listing.write_text("\n".join(roots) + "\n")
        cmd = ["/bin/sh", "-c", f'exec "$0" "$@" --stdin < {listing}', *cmd]
    else:
        cmd += roots
    return timed(cmd, env, server.received_bytes)


def push_nix_copy(server, repo, token, roots, level, work):
    netrc = work / f"netrc-{repo}"
    host = server.url.split("//")[1].split(":")[0]
    netrc.write_text(f"machine {host} login bench password {token}\n")
    dest = f"{server.url}/{repo}?compression=xz&compression-level={level}"
    cmd = [*NIX, "copy", "--to", dest, "--option", "netrc-file", str(netrc)]
    if len(roots) > 200:
        listing = work / f"roots-{repo}.txt"
        listing.write_text("\n".join(roots) + "\n")
        cmd = ["/bin/sh", "-c", f'exec "$0" "$@" $(cat {listing})', *cmd]
    else:
        cmd += roots
    # A fresh narinfo cache per run: a CI machine pushing a new closure has none, and a warm
    # one would let `nix copy` skip its per-path queries.
    env = dict(os.environ, XDG_CACHE_HOME=tempfile.mkdtemp(dir=work, prefix="nix-cache-"))
    return timed(cmd, env, server.received_bytes)


def xz_baseline(path, level, work):
    """`nix-store --dump | xz -T<cores>`: the multithreaded xz reference for one huge NAR."""
    cmd = ["/bin/sh", "-c", f"nix-store --dump {path} | xz -T{os.cpu_count()} -{level} -c > /dev/null"]
    return timed(cmd, dict(os.environ))


def dump_nars(closure, work):
    """Every NAR of the closure as a file (untimed), for the compress-only runs."""
    nars = work / "nars"
    if not nars.exists():
        nars.mkdir(parents=True)
        for i, path in enumerate(closure):
            with open(nars / f"{i}.nar", "wb") as out:
                subprocess.run(["nix-store", "--dump", path], stdout=out, check=True)
    return nars


def compress_only(nars, level):
    """The bare compression a push of these NARs needs: liblzma (the xz tool, with the x86
    filter the push uses on x86_64) or libzstd at the same level on every core, files in
    parallel, no store, no network, no server."""
    method, _, number = str(level).rpartition(":")
    cores = os.cpu_count()
    if method == "zstd":
        tool = f"zstd -q -{number} -T{cores} -c"
    else:
        x86 = "--x86 " if platform.machine() == "x86_64" else ""
        tool = f"xz -T{cores} {x86}--lzma2=preset={number} -c"
    cmd = ["/bin/sh", "-c", f"find {nars} -name '*.nar' -print0 | xargs -0 -P{cores} -n 64 {tool} > /dev/null"]
    return timed(cmd, dict(os.environ))


def pusher_name(level):
    base = level.removesuffix("+nobatch")
    name = "stowix (default)" if base == "default" else f"stowix -{base}"
    return name + (" --no-batch" if base != level else "")


def default_xz_level(stowix):
    text = sh([stowix, "nix", "push", "--help"])
    m = re.search(r"xz 0 \(fastest\) to 9 \(smallest\) \[default: (\d+)\]", text)
    return int(m.group(1)) if m else 2


def check_substitution(server, repo, key, closure, work, sample=5):
    picked = random.Random(repo).sample(closure, min(sample, len(closure)))
    dest = Path(tempfile.mkdtemp(dir=work, prefix="subst-"))
    env = dict(os.environ, XDG_CACHE_HOME=str(dest / "cache"))
    sh([*NIX, "copy", "--from", f"{server.url}/{repo}", "--to", str(dest / "store"),
        "--option", "trusted-public-keys", key, "--option", "require-sigs", "true",
        "--option", "narinfo-cache-negative-ttl", "0", *picked], env=env)
    shutil.rmtree(dest, ignore_errors=True)


def median(values):
    return statistics.median(values)


def spread(values):
    return f"{min(values):.2f}–{max(values):.2f}" if len(values) > 1 else "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", default="realistic,small,huge", help="comma-separated: realistic, small, huge")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--huge-reps", type=int, default=1)
    parser.add_argument("--levels", default="6,default", help="stowix xz presets to run ('default' = no flag), or method:level such as zstd:3; a '+nobatch' suffix adds --no-batch")
    parser.add_argument("--huge-levels", default="6,default", help="stowix presets for the huge corpus")
    parser.add_argument("--nix-level", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "benchmark-throughput.png"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--small-count", type=int, default=10000)
    parser.add_argument("--real-paths", type=int, default=300)
    parser.add_argument("--real-mib", type=int, default=250)
    parser.add_argument("--huge-gib", type=int, default=2)
    parser.add_argument("--compress-only", action="store_true",
                        help="also time bare compression of the same NARs at each level (the pipeline-overhead baseline)")
    args = parser.parse_args()

    log("building stowix (release)")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    stowix = str(ROOT / "target" / "release" / "stowix")
    work = Path(tempfile.mkdtemp(prefix="stowix-bench-"))
    nonce = f"{time.time_ns()}"
    server = Server(stowix, work)
    results = {}
    plot_series = {}
    repo_counter = [0]

    def fresh_repo(tag):
        repo_counter[0] += 1
        name = f"{tag}-{repo_counter[0]}"
        key, token = server.new_repo(name)
        return name, key, token

    try:
        for corpus in args.corpora.split(","):
            log(f"building corpus {corpus}")
            t0 = time.monotonic()
            build = {
                "realistic": lambda: corpus_realistic(work, nonce, args.real_paths, args.real_mib),
                "small": lambda: corpus_small(work, nonce, args.small_count),
                "huge": lambda: corpus_huge(work, nonce, args.huge_gib),
            }[corpus]
            roots = build()
            closure = closure_of(roots)
            total_nar = nar_bytes(closure)
            log(f"corpus {corpus}: {len(closure)} paths, {total_nar / 2**20:.1f} MiB NAR, built in {time.monotonic() - t0:.0f} s")
            reps = args.huge_reps if corpus == "huge" else args.reps
            levels = args.huge_levels if corpus == "huge" else args.levels
            pushers = [("nix copy", None)] + [(pusher_name(lvl), lvl) for lvl in levels.split(",")]
            runs = {name: [] for name, _ in pushers}
            warm_repos = {}
            for rep in range(reps):
                order = pushers if rep % 2 == 0 else list(reversed(pushers))
                for name, lvl in order:
                    repo, key, token = fresh_repo(corpus)
                    before = server.received_bytes()
                    cpu_before = server.cpu_seconds()
                    if name == "nix copy":
                        r = push_nix_copy(server, repo, token, roots, args.nix_level, work)
                    else:
                        r = push_stowix(stowix, server, repo, token, roots, None if lvl == "default" else lvl, work)
                    r["sent"] = server.received_bytes() - before
                    r["server_cpu"] = server.cpu_seconds() - cpu_before
                    r["stored"] = server.stored_bytes(repo)
                    check_substitution(server, repo, key, closure, work)
                    runs[name].append(r)
                    warm_repos[name] = (repo, token)
                    log(f"{corpus} rep {rep} {name}: {r['wall']:.2f} s wall, {r['cpu']:.1f} s CPU, "
                        f"{r['rss_mib']:.0f} MiB RSS, {r['stored'] / 2**20:.1f} MiB stored")
                    if corpus == "realistic" and rep == 0:
                        plot_series[name] = r["samples"]
            warm = {}
            if corpus in ("realistic", "small"):
                for name, lvl in pushers:
                    repo, token = warm_repos[name]
                    warm[name] = []
                    for _ in range(reps):
                        if name == "nix copy":
                            r = push_nix_copy(server, repo, token, roots, args.nix_level, work)
                        else:
                            r = push_stowix(stowix, server, repo, token, roots, None if lvl == "default" else lvl, work)
                        warm[name].append(r)
                    log(f"{corpus} warm {name}: median {median([r['wall'] for r in warm[name]]):.2f} s")
            baseline = {}
            if args.compress_only and corpus != "huge":
                nars = dump_nars(closure, work / corpus)
                default_level = default_xz_level(stowix)
                for lvl in levels.split(","):
                    spec = lvl.removesuffix("+nobatch").replace("default", str(default_level))
                    if ":" not in spec and not spec.isdigit():
                        continue
                    tag = spec if ":" in spec else f"xz:{spec}"
                    if f"compress only {tag}" in baseline:
                        continue
                    walls = [compress_only(nars, spec)["wall"] for _ in range(reps)]
                    baseline[f"compress only {tag}"] = {"wall": median(walls), "runs": walls,
                                                        "pushers": [n for n, l in pushers if l is not None and
                                                                    l.removesuffix("+nobatch") == lvl.removesuffix("+nobatch")]}
                    log(f"{corpus}: compress only {tag}: median {median(walls):.2f} s")
            if corpus == "huge":
                for lvl in sorted({args.nix_level, default_xz_level(stowix)}):
                    r = xz_baseline(closure[0], lvl, work)
                    baseline[f"xz -T{os.cpu_count()} -{lvl}"] = r
                    log(f"huge: xz -T{os.cpu_count()} -{lvl}: {r['wall']:.1f} s")
            results[corpus] = {"paths": len(closure), "nar": total_nar, "runs": runs, "warm": warm,
                               "baseline": baseline}
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    write_report(args, results, plot_series)


def write_report(args, results, plot_series):
    lines = ["<!-- generated:start (benches/e2e.py rewrites this part; edit outside the markers) -->", "",
             "### Machine", ""]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
    lines += [f"- CPU: {cpu}, {os.cpu_count()} cores; memory {int(mem) // 2**20} GiB; {platform.platform()}",
              f"- {sh(['nix', '--version']).strip()}; {sh(['rustc', '--version']).strip()}; "
              f"stowix {sh(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD']).strip()}"
              f"{' (with uncommitted changes)' if sh(['git', '-C', str(ROOT), 'status', '--porcelain', '--untracked-files=no']).strip() else ''}",
              f"- Date: {time.strftime('%Y-%m-%d')}. Same server (`stowix serve`, release build) for both pushers; "
              "each run into a fresh repository; runs alternate in order; medians, spread is min–max.", ""]
    for corpus, res in results.items():
        lines += [f"### Corpus: {corpus} ({res['paths']} paths, {res['nar'] / 2**20:.1f} MiB of NAR)", "",
                  "| pusher | runs | wall s (median) | spread | vs nix copy | paths/s | CPU s | server CPU s | peak RSS MiB | MiB sent | MiB stored | size vs nix copy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base = median([r["wall"] for r in res["runs"]["nix copy"]])
        base_stored = median([r["stored"] for r in res["runs"]["nix copy"]])
        for name, runs in res["runs"].items():
            walls = [r["wall"] for r in runs]
            lines.append(f"| {name} | {len(runs)} | {median(walls):.2f} | {spread(walls)} | "
                         f"{base / median(walls):.2f}x | {res['paths'] / median(walls):.0f} | "
                         f"{median([r['cpu'] for r in runs]):.1f} | {median([r['server_cpu'] for r in runs]):.1f} | "
                         f"{max(r['rss_mib'] for r in runs):.0f} | {median([r['sent'] for r in runs]) / 2**20:.1f} | "
                         f"{median([r['stored'] for r in runs]) / 2**20:.1f} | "
                         f"{median([r['stored'] for r in runs]) / base_stored * 100 - 100:+.1f}% |")
        overhead = {name: r for name, r in res.get("baseline", {}).items() if name.startswith("compress only")}
        if overhead:
            lines += ["", "Pipeline overhead: each push beside the bare compression of the same NARs at the same level "
                      "on every core (`xargs -P` over `xz`/`zstd`, files already dumped; no store, network or server):", "",
                      "| pusher | push wall s | compress only wall s (runs) | push / compress only |", "|---|---|---|---|"]
            for name, r in overhead.items():
                for pusher in r["pushers"]:
                    walls = [x["wall"] for x in res["runs"][pusher]]
                    lines.append(f"| {pusher} | {median(walls):.2f} | {r['wall']:.2f} ({spread(r['runs'])}) | "
                                 f"{median(walls) / r['wall']:.2f} |")
        bare = {name: r for name, r in res.get("baseline", {}).items() if not name.startswith("compress only")}
        if bare:
            lines += ["", "Multithreaded xz on the same NAR (`nix-store --dump | xz`, no network, no server):", "",
                      "| command | wall s | MiB/s of NAR | CPU s | peak RSS MiB |", "|---|---|---|---|---|"]
            for name, r in bare.items():
                lines.append(f"| {name} | {r['wall']:.1f} | {res['nar'] / 2**20 / r['wall']:.1f} | {r['cpu']:.1f} | {r['rss_mib']:.0f} |")
            lines += ["", "Throughput of the pushers on this corpus, in MiB/s of NAR: " + ", ".join(
                f"{name} {res['nar'] / 2**20 / median([r['wall'] for r in runs]):.1f}" for name, runs in res["runs"].items()) + "."]
        if res["warm"]:
            lines += ["", "Warm (everything already present):", "",
                      "| pusher | wall s (median) | spread | vs nix copy |", "|---|---|---|---|"]
            wbase = median([r["wall"] for r in res["warm"]["nix copy"]])
            for name, runs in res["warm"].items():
                walls = [r["wall"] for r in runs]
                lines.append(f"| {name} | {median(walls):.2f} | {spread(walls)} | {wbase / median(walls):.1f}x |")
        lines.append("")
    if plot_series:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
            for name, samples in plot_series.items():
                t0, b0 = samples[0]
                xs = [t for t, _ in samples]
                top.plot(xs, [(b - b0) / 2**20 for _, b in samples], label=name)
                # A 2 s window: the server counts bytes as they arrive, so 100 ms samples of
                # per-request uploads are too spiky to read.
                window = 20
                rates = [(samples[i][1] - samples[i - window][1]) / (samples[i][0] - samples[i - window][0]) / 2**20
                         for i in range(window, len(samples))]
                bottom.plot(xs[window:], rates, label=name)
            top.set_ylabel("MiB received by the server")
            top.set_title("Corpus realistic, cold: bytes uploaded over time")
            top.legend()
            bottom.set_ylabel("MiB/s (2 s average)")
            bottom.set_xlabel("seconds since start")
            fig.tight_layout()
            fig.savefig(args.plot, dpi=110)
            lines += [f"![throughput over time]({Path(args.plot).name})", ""]
        except ImportError:
            lines += ["(matplotlib not installed: no plot; `pip install matplotlib`)", ""]
    lines.append("<!-- generated:end -->")
    generated = "\n".join(lines)
    out = Path(args.out)
    previous = out.read_text() if out.exists() else ""
    start, end = "<!-- generated:start", "<!-- generated:end -->"
    if start in previous and end in previous:
        text = previous[:previous.index(start)] + generated + previous[previous.index(end) + len(end):]
    else:
        text = "# Benchmarks\n\n" + generated + "\n"
    out.write_text(text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
