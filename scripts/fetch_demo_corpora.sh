#!/usr/bin/env bash
# Fetch the public-domain prose used to train the demo MoE, from Debian packages (offline-safe:
# only the Debian archive is needed). Usage: scripts/fetch_demo_corpora.sh OUT_DIR
# Code comes from the interpreter's own standard library and needs no download.
set -euo pipefail
out=${1:?usage: fetch_demo_corpora.sh OUT_DIR}
mkdir -p "$out/prose" "$out/debs"
cd "$out/debs"
apt-get download bible-kjv bible-kjv-text jargon-text dict-devil fortunes-min
for deb in *.deb; do dpkg-deb -x "$deb" root; done
root/usr/bin/bible -p root/usr/lib -f "Gen1:1-Rev22:21" </dev/null >"$out/prose/kjv.txt"
zcat root/usr/share/doc/jargon-text/jargon.txt.gz >"$out/prose/jargon.txt"
zcat root/usr/share/dictd/devil.dict.dz >"$out/prose/devil.txt"
cat root/usr/share/games/fortunes/{fortunes,literature,riddles} >"$out/prose/fortunes.txt"
wc -c "$out"/prose/*.txt
