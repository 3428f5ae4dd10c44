#!/usr/bin/env bash
# Measures one `stowix admin gc` over a synthetic repository inserted straight into the
# metadata database: two "releases" of PATHS/2 paths each, 50 layers deep, every path
# referencing 3 paths of the layer below in its release. The old release was last used 60
# days ago, the new one today; with `--retention 30d` the collection removes the whole old
# release and keeps the new one (every kept path reached through the reference graph).
#
#   scripts/gc-measure.sh sqlite   [PATHS]   (default 100000)
#   scripts/gc-measure.sh postgres [PATHS]   (needs PostgreSQL at 127.0.0.1:5432, user postgres)
#
# Prints the collection's summary line and /usr/bin/time's wall time and peak RSS.
set -euo pipefail
backend=${1:?sqlite or postgres}
paths=${2:-100000}
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${STOWIX_BIN:-$here/target/release/stowix}
[ -x "$bin" ] || bin=$here/target/debug/stowix
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
now=2000000000
args=(--data-dir "$work/data")
if [ "$backend" = postgres ]; then
  db=stowix_gc_measure_$$
  psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $db"
  trap 'rm -rf "$work"; psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE $db"' EXIT
  args+=(--database "postgres://postgres@127.0.0.1:5432/$db")
fi
"$bin" admin "${args[@]}" repo create bench >/dev/null
"$bin" admin "${args[@]}" repo configure bench --retention 30d 2>/dev/null

python3 - "$backend" "$paths" "$now" "$work" <<'EOF'
import random, sys, io
backend, paths, now, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
layers = 50
per_layer = max(1, paths // 2 // layers)
random.seed(1)
alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
def h(i): 
    s = ""
    for _ in range(32):
        s += alphabet[i % 32]; i //= 32
    return s
narinfos, refs, nars = [], [], []
n = 0
for release, used in ((0, now - 60 * 86400), (1, now)):
    below = []
    for layer in range(layers):
        here = []
        for _ in range(per_layer):
            hash = h(n * 7919 + 12345)
            n += 1
            url = f"nar/{hash}{hash[:20]}.nar.xz"
            narinfos.append((hash, f"/nix/store/{hash}-p{n}", url, used))
            nars.append((url, 4096))
            for r in random.sample(below, min(3, len(below))):
                refs.append((hash, r))
            here.append(hash)
        below = here
if backend == "sqlite":
    import sqlite3
    db = sqlite3.connect(f"{work}/data/stowix.db")
    db.executemany("INSERT INTO narinfos (repo, hash, store_path, nar_hash, text, published_at, last_used_at, nar_url) VALUES ('bench', ?, ?, 'sha256:x', 'x', ?, ?, ?)",
                   [(a, b, d, d, c) for (a, b, c, d) in narinfos])
    db.executemany("INSERT INTO narinfo_refs (repo, hash, ref_hash) VALUES ('bench', ?, ?)", refs)
    db.executemany("INSERT INTO nars (repo, url, compression, nar_hash, nar_size, file_hash, file_size, created_at, object_key) VALUES ('bench', ?, 'xz', 'sha256:x', 1, 'sha256:y', ?, 0, 'bench/' || ?)",
                   [(u, s, u) for (u, s) in nars])
    db.commit()
else:
    out = io.StringIO()
    out.write("COPY narinfos (repo, hash, store_path, nar_hash, text, published_at, last_used_at, nar_url) FROM stdin;\n")
    for (a, b, c, d) in narinfos:
        out.write(f"bench\t{a}\t{b}\tsha256:x\tx\t{d}\t{d}\t{c}\n")
    out.write("\\.\nCOPY narinfo_refs (repo, hash, ref_hash) FROM stdin;\n")
    for (a, b) in refs:
        out.write(f"bench\t{a}\t{b}\n")
    out.write("\\.\nCOPY nars (repo, url, compression, nar_hash, nar_size, file_hash, file_size, created_at, object_key) FROM stdin;\n")
    for (u, s) in nars:
        out.write(f"bench\t{u}\txz\tsha256:x\t1\tsha256:y\t{s}\t0\tbench/{u}\n")
    out.write("\\.\nANALYZE;\n")
    open(f"{work}/load.sql", "w").write(out.getvalue())
print(f"inserted {len(narinfos)} paths, {len(refs)} references", file=sys.stderr)
EOF
if [ "$backend" = postgres ]; then
  psql -h 127.0.0.1 -U postgres -q -d "$db" -f "$work/load.sql"
fi
echo "collecting with $bin" >&2
/usr/bin/time -f "wall %e s, peak RSS %M KiB" "$bin" admin "${args[@]}" gc --repo bench --now "$now" \
  | grep -v '^  '
