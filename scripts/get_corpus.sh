#!/usr/bin/env bash
# Builds the default training corpus, the King James Bible from Debian's bible-kjv:
#   <out_dir>/kjv.txt           plain text, one verse per line, chapters separated by a
#                               blank line (lckv-prepare reads each chapter as a document)
#   <out_dir>/tokenizer.model   BPE tokenizer trained on the training split
#   <out_dir>/train_*.bin, val_*.bin, meta.json   token shards (the last 1% of chapters,
#                               from Revelation, are the validation split)
#
# Usage: scripts/get_corpus.sh [out_dir (default data/kjv)] [vocab_size (default 4096)]
# lckv-prepare is taken from $LCKV_BUILD_DIR (default build/); build it first with
#   cmake --build build --target lckv-prepare
# Steps whose outputs already exist are skipped; delete them to redo a step.
# LCKV_CORPUS_TEXT_ONLY=1 stops after kjv.txt (the tokenizer tests need the text only).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/data/kjv}"
vocab="${2:-4096}"
build="${LCKV_BUILD_DIR:-$root/build}"
prepare="$build/lckv-prepare"

if ! command -v bible >/dev/null; then
  echo "get_corpus: 'bible' (Debian package bible-kjv) not found: run scripts/setup.sh" >&2
  exit 1
fi
mkdir -p "$out"

if [[ -s "$out/kjv.txt" ]]; then
  echo "get_corpus: $out/kjv.txt exists, skipping extraction"
else
  echo "get_corpus: extracting the King James Bible to $out/kjv.txt"
  # `bible` prints, per chapter, a blank line, a heading such as "1 Samuel 3", a blank
  # line, then one "  <verse number> <text>" line per verse (-l sets the line width, so a
  # huge width keeps every verse on one line). Keep only the verse text; a blank line
  # before each heading after the first separates the chapters. Any other line means the
  # format changed, so stop rather than write a corpus with stray references in it.
  bible -l1000000 "Genesis 1:1-Revelation 22:21" | awk '
    /^$/ { next }
    /^  [0-9]+ / { sub(/^  [0-9]+ /, ""); print; next }
    /^([1-3] )?[A-Z][A-Za-z ]* [0-9]+$/ { if (chapters++) print ""; next }
    { print "get_corpus: unexpected line " NR " from bible: " $0 > "/dev/stderr"; bad = 1; exit 1 }
    END {
      if (bad) exit 1
      if (chapters != 1189) { print "get_corpus: expected 1189 chapters, got " chapters > "/dev/stderr"; exit 1 }
    }
  ' >"$out/kjv.txt.tmp"
  mv "$out/kjv.txt.tmp" "$out/kjv.txt"
  echo "get_corpus: $(grep -c . "$out/kjv.txt") verses, $(wc -c <"$out/kjv.txt") bytes"
fi

[[ "${LCKV_CORPUS_TEXT_ONLY:-0}" == 1 ]] && exit 0

# meta.json is written last by lckv-prepare, so it marks a complete run; redo when the
# vocabulary size asked for differs from the one prepared.
if [[ -f "$out/meta.json" ]] && grep -qE "\"vocab_size\": $vocab(,|\$)" "$out/meta.json"; then
  echo "get_corpus: $out/meta.json exists (vocab $vocab), skipping tokenizer and shards"
  exit 0
fi
if [[ ! -x "$prepare" ]]; then
  echo "get_corpus: $prepare not found: build it with 'cmake --build ${build} --target lckv-prepare'" \
    "or set LCKV_BUILD_DIR" >&2
  exit 1
fi
echo "get_corpus: $prepare $out/kjv.txt --train-tokenizer --vocab-size $vocab --out $out"
"$prepare" "$out/kjv.txt" --train-tokenizer --vocab-size "$vocab" --model-type bpe --out "$out"
