#!/usr/bin/env bash
# Makes .patched-crates/NAME-VERSION (git-ignored) for each crate Cargo.toml's [patch.crates-io]
# points at: the crates.io source, checked against its published sha256, with every one of our
# patches/NAME-VERSION-*.patch applied in sorted order (README, "Patched crates"). Idempotent: a
# marker records the checksums each directory was made from (the crate's and each patch's), and
# nothing is touched while they match (so cargo sees no change and rebuilds nothing).
#
# It must run before any cargo command in this clone: with a directory missing, cargo cannot
# load our manifest at all. So a pristine .crate is fetched, when cargo's cache lacks it, by a
# throwaway project that depends on NAME =VERSION and reuses our Cargo.lock.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

tmp=""
trap 'rm -rf "$tmp"' EXIT

# patch_crate NAME VERSION SHA256 (the .crate's sha256 as published: its Cargo.lock checksum).
patch_crate() {
  local name="$1" version="$2" crate_sha="$3"
  local dest marker patches want patch cargo_home crate
  dest="$ORCH_ROOT/.patched-crates/$name-$version"
  marker="$dest/.orchestrator-patch"
  # Sorted by the C locale, so the order does not depend on the user's.
  mapfile -t patches < <(LC_ALL=C ls -1 "$ORCH_ROOT"/patches/"$name-$version"-*.patch 2>/dev/null | LC_ALL=C sort)
  if [ "${#patches[@]}" -eq 0 ]; then
    echo "patch-crates: no patches/$name-$version-*.patch" >&2
    return 1
  fi
  want="crate $crate_sha"
  for patch in "${patches[@]}"; do
    want+=" patch $(basename "$patch") $(sha256sum "$patch" | cut -d' ' -f1)"
  done

  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then
    return 0
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

  rm -rf "$tmp"
  tmp="$(mktemp -d)"
  if ! crate="$(find_crate)"; then
    echo "patch-crates: fetching $name $version from crates.io"
    mkdir -p "$tmp/fetch/src"
    : > "$tmp/fetch/src/lib.rs"
    printf '[package]\nname = "orchestrator-fetch-pristine"\nversion = "0.0.0"\nedition = "2021"\npublish = false\n\n[dependencies]\n%s = "=%s"\n' \
      "$name" "$version" > "$tmp/fetch/Cargo.toml"
    # Our lock keeps every other version where it was, so the fetch downloads what the real build
    # needs anyway.
    cp "$ORCH_ROOT/Cargo.lock" "$tmp/fetch/Cargo.lock"
    (cd "$tmp/fetch" && cargo fetch --quiet)
    crate="$(find_crate)" || {
      echo "patch-crates: no $name-$version.crate with sha256 $crate_sha in $cargo_home/registry/cache" >&2
      return 1
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
}

patch_crate mistralrs-core 0.8.1 a2b8b9e5c94491d9ceeded3a30291cb6af6ae74810a5776dd55e3bbb8b3429d4
patch_crate candle-core 0.10.2 6bd9895436c1ba5dc1037a19935d084b838db066ff4e15ef7dded020b7c12a4a
