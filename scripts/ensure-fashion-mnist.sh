#!/usr/bin/env bash
# Makes sure the Fashion-MNIST IDX files are present; installs the Debian package when we can.
set -u
files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
candidates=()
[ -n "${HIERCLUSTER_DATA:-}" ] && candidates+=("$HIERCLUSTER_DATA/fashion-mnist" "$HIERCLUSTER_DATA")
candidates+=("data/fashion-mnist" "/usr/share/datasets/fashion-mnist")

has_all() {
    for f in $files; do [ -s "$1/$f" ] || return 1; done
}
for d in "${candidates[@]}"; do
    if has_all "$d"; then echo "Fashion-MNIST found in $d"; exit 0; fi
done

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "Fashion-MNIST not found; installing the Debian package dataset-fashion-mnist ..."
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
        && has_all /usr/share/datasets/fashion-mnist; then
        echo "Fashion-MNIST installed in /usr/share/datasets/fashion-mnist"
        exit 0
    fi
    echo "error: installing dataset-fashion-mnist with apt-get failed." >&2
fi
cat >&2 <<MSG
error: Fashion-MNIST was not found. Searched: ${candidates[*]}
Get it in one of these ways:
  - as root on Debian/Ubuntu:  apt-get update && apt-get install -y dataset-fashion-mnist
  - or put the four files ($files) in data/fashion-mnist/
    or in a folder named by the environment variable HIERCLUSTER_DATA.
MSG
exit 1
