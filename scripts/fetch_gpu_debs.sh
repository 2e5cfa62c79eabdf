#!/usr/bin/env bash
# Downloads, here (with network), the Debian packages of the build dependencies that the GPU
# machine's image lacks, into third_party/debs (git-ignored). scripts/gpu_check.sh unpacks them
# there with `dpkg -x`; pass the folders to the device tool with carry: ["third_party/debs",
# "third_party/sdist"] (the second, SentencePiece's source, is fetched by scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=third_party/debs
PACKAGES=(catch2 libcli11-dev nlohmann-json3-dev libpcre2-dev libpcre2-8-0)
mkdir -p "$DEST"
cd "$DEST"
rm -f ./*.deb
apt-get download "${PACKAGES[@]}"
ls -l
