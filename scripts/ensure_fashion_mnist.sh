#!/bin/sh
# Make sure the four Fashion-MNIST idx files are present (Debian package dataset-fashion-mnist).
ROOT="${GEAR_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
missing() { for f in $FILES; do [ -f "$ROOT/$f" ] || return 0; done; return 1; }
missing || exit 0
if [ "$ROOT" = /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  ($SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1) || \
    ($SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null)
fi
if missing; then
  echo "Fashion-MNIST not found under $ROOT. Install the Debian package dataset-fashion-mnist, or put the four" >&2
  echo "idx files ($FILES) in a folder and run with GEAR_FASHION_MNIST=DIR (or data.root=DIR)." >&2
  exit 1
fi
