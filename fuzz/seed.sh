#!/usr/bin/env bash
# Builds the seed corpora of the fuzz targets from real Nix output, so no binary blob is
# committed: NARs from `nix-store --dump`, narinfos written by `nix copy --to file://`, and
# `nix path-info --json` output. Needs Nix (`apt-get install nix-bin`) with a writable store.
#
#   fuzz/seed.sh [STORE_PATH...]     # extra store paths to include (their closures too)
#
# Writes fuzz/corpus/{nar_validate,narinfo_parse,path_info_json}/, replacing seed-* files.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
corpus="$here/corpus"
nixx=(nix --extra-experimental-features nix-command)
for tool in nix nix-store; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; install nix-bin" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A tree with every kind of NAR node: nested and empty directories, empty, 1, 7, 8 and 9 byte
# files, an executable, a 0655 file (not executable), relative, absolute and dangling
# symlinks, names that sort by byte (upper case, `~`, UTF-8) and a name of 8 bytes.
tree="$work/tree"
mkdir -p "$tree/sub/deeper" "$tree/empty-dir"
: > "$tree/empty"
printf a > "$tree/one"; printf 1234567 > "$tree/seven"
printf 12345678 > "$tree/eight8ch"; printf 123456789 > "$tree/nine"
printf '#!/bin/sh\necho hi\n' > "$tree/sub/run"; chmod 0755 "$tree/sub/run"
printf 'not exec\n' > "$tree/sub/mode0655"; chmod 0655 "$tree/sub/mode0655"
printf 'Z\n' > "$tree/Zupper"; printf '~\n' > "$tree/~tilde"; printf 'e\n' > "$tree/é"
printf 'deep\n' > "$tree/sub/deeper/file"
ln -s one "$tree/link-relative"
ln -s /nix/store "$tree/link-absolute"
ln -s /nonexistent/target "$tree/link-dangling"
printf 'hello\n' > "$work/hello"
ln -s target "$work/symlink-root"
# The executable-file test vector of docs (`a`, mode 0755).
printf a > "$work/exe"; chmod 0755 "$work/exe"

mapfile -t added < <(nix-store --add "$tree" "$work/hello" "$work/symlink-root" "$work/exe")
# Input-addressed paths too (they have a Deriver, references and, signed below, a Sig line).
cat > "$work/seed.nix" <<'NIX'
let
  dep = derivation { name = "seed-dep"; system = builtins.currentSystem; builder = "/bin/sh";
                     args = [ "-c" "echo dependency > $out" ]; };
in derivation { name = "seed+top=1?"; system = builtins.currentSystem; builder = "/bin/sh";
                args = [ "-c" "echo ${dep} $out > $out" ]; }
NIX
mapfile -t -O "${#added[@]}" added < <(nix-build "$work/seed.nix" --no-out-link --option substituters '')
"${nixx[@]}" key generate-secret --key-name stowix-fuzz-seed-1 > "$work/key"
"${nixx[@]}" store sign --key-file "$work/key" --recursive "${added[@]}"
mapfile -t paths < <(nix-store -qR "${added[@]}" "$@" | sort -u)

mkdir -p "$corpus/nar_validate" "$corpus/narinfo_parse" "$corpus/path_info_json"
rm -f "$corpus"/*/seed-*

i=0
for p in "${paths[@]}"; do
  i=$((i + 1))
  # Keep the corpus small: libFuzzer works best on seeds of a few KiB.
  size=$(nix-store --dump "$p" | wc -c)
  if [ "$size" -le 262144 ]; then
    nix-store --dump "$p" > "$corpus/nar_validate/seed-$i.nar"
  fi
done
# Parts of the tree as NARs of their own (a file root, a directory root, a symlink root).
nix-store --dump "$tree/sub" > "$corpus/nar_validate/seed-sub.nar"
nix-store --dump "$tree/empty-dir" > "$corpus/nar_validate/seed-empty-dir.nar"
nix-store --dump "$tree/empty" > "$corpus/nar_validate/seed-empty-file.nar"
nix-store --dump "$tree/link-dangling" > "$corpus/nar_validate/seed-symlink.nar"

# Real narinfos, as `nix copy` writes them, uncompressed and xz.
for compression in none xz; do
  "${nixx[@]}" copy --to "file://$work/cache-$compression?compression=$compression" "${paths[@]}"
  for f in "$work/cache-$compression"/*.narinfo; do
    cp "$f" "$corpus/narinfo_parse/seed-$compression-$(basename "$f")"
  done
done

# path-info JSON as this Nix prints it (the array form of 2.4 .. 2.18, the object of 2.19+).
"${nixx[@]}" path-info --json "${added[0]}" > "$corpus/path_info_json/seed-one.json"
"${nixx[@]}" path-info --json --recursive "${paths[@]}" > "$corpus/path_info_json/seed-closure.json"
"${nixx[@]}" path-info --json --sigs "${paths[@]}" /nix/store/00000000000000000000000000000000-invalid \
  > "$corpus/path_info_json/seed-invalid.json" 2>/dev/null || true
# The other shapes newer Nix prints, derived from the same data when python3 is there.
if command -v python3 >/dev/null; then
  python3 - "$corpus/path_info_json" <<'PY'
import json, sys, os
d = sys.argv[1]
items = json.load(open(os.path.join(d, "seed-closure.json")))
if isinstance(items, list):
    obj = {i["path"]: {k: v for k, v in i.items() if k != "path"} for i in items}
    obj["/nix/store/00000000000000000000000000000000-gone"] = None
    json.dump(obj, open(os.path.join(d, "seed-object.json"), "w"))
    info = {}
    for i in items:
        e = {k: v for k, v in i.items() if k != "path"}
        e["references"] = [r.rsplit("/", 1)[1] for r in e.get("references", [])]
        if "ca" in e:
            method, _, rest = e["ca"].partition(":")
            e["ca"] = {"method": "nar", "hash": e["narHash"]}
        e["signatures"] = [{"keyName": s.split(":")[0], "sig": s.split(":", 1)[1]}
                           for s in e.get("signatures", [])]
        info[i["path"].rsplit("/", 1)[1]] = e
    json.dump({"version": 2, "storeDir": "/nix/store", "info": info},
              open(os.path.join(d, "seed-v2.json"), "w"))
PY
fi

for t in nar_validate narinfo_parse path_info_json; do
  echo "$t: $(ls "$corpus/$t" | wc -l) files in fuzz/corpus/$t"
done
