#!/usr/bin/env bash
# Makes .patched-crates/mistralrs-core-0.8.1 (git-ignored), the crate Cargo.toml's
# [patch.crates-io] points at: the crates.io source of mistralrs-core 0.8.1, checked against its
# published sha256, with every one of our patches/mistralrs-core-0.8.1-*.patch applied in sorted
# order (README, "Patched mistral.rs"). Idempotent: a marker records the checksums it was made
# from (the crate's and each patch's), and nothing is touched while they match (so cargo sees no
# change and rebuilds nothing).
#
# It must run before any cargo command in this clone: with the directory missing, cargo cannot
# load our manifest at all. So the pristine .crate is fetched, when cargo's cache lacks it, by a
# throwaway project that depends on mistralrs-core =0.8.1 and reuses our Cargo.lock.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

name=mistralrs-core
version=0.8.1
# sha256 of mistralrs-core-0.8.1.crate as published on crates.io (its Cargo.lock checksum).
crate_sha=a2b8b9e5c94491d9ceeded3a30291cb6af6ae74810a5776dd55e3bbb8b3429d4
dest="$ORCH_ROOT/.patched-crates/$name-$version"
marker="$dest/.orchestrator-patch"
# Sorted by the C locale, so the order does not depend on the user's.
mapfile -t patches < <(LC_ALL=C ls -1 "$ORCH_ROOT"/patches/"$name-$version"-*.patch 2>/dev/null | LC_ALL=C sort)
if [ "${#patches[@]}" -eq 0 ]; then
  echo "patch-crates: no patches/$name-$version-*.patch" >&2
  exit 1
fi
want="crate $crate_sha"
for patch in "${patches[@]}"; do
  want+=" patch $(basename "$patch") $(sha256sum "$patch" | cut -d' ' -f1)"
done

if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then
  exit 0
fi

cargo_home="${CARGO_HOME:-$HOME/.cargo}"
find_crate() {
  local f
  for f in "$cargo_home"/registry/cache/*/"$name-$version.crate"; do
    if [ -f "$f" ] && [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$crate_sha" ]; then
      echo "$f"
      return 0
    fi
  done
  return 1
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if ! crate="$(find_crate)"; then
  echo "patch-crates: fetching $name $version from crates.io"
  mkdir -p "$tmp/fetch/src"
  : > "$tmp/fetch/src/lib.rs"
  cat > "$tmp/fetch/Cargo.toml" <<EOF
[package]
name = "orchestrator-fetch-pristine"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
$name = "=$version"
EOF
  # Our lock keeps every other version where it was, so the fetch downloads what the real build
  # needs anyway.
  cp "$ORCH_ROOT/Cargo.lock" "$tmp/fetch/Cargo.lock"
  (cd "$tmp/fetch" && cargo fetch --quiet)
  crate="$(find_crate)" || {
    echo "patch-crates: no $name-$version.crate with sha256 $crate_sha in $cargo_home/registry/cache" >&2
    exit 1
  }
fi

echo "patch-crates: $name $version + $(for p in "${patches[@]}"; do basename "$p"; done | paste -sd' ') -> $dest"
mkdir -p "$tmp/src"
tar -xzf "$crate" -C "$tmp/src"
# A repository of its own, so git applies the patches relative to the crate (not to our clone).
git -C "$tmp/src/$name-$version" init --quiet
for patch in "${patches[@]}"; do
  git -C "$tmp/src/$name-$version" apply --check "$patch"
  git -C "$tmp/src/$name-$version" apply "$patch"
done
rm -rf "$tmp/src/$name-$version/.git"
echo "$want" > "$tmp/src/$name-$version/.orchestrator-patch"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$tmp/src/$name-$version" "$dest"
