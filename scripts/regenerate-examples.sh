#!/usr/bin/env bash
# Regenerates config/*.example.yaml and registration/*.example.yaml from the binaries.
# tests/tests/examples_in_sync.rs fails when the committed files drift from this output.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --workspace --bins --examples
target=${CARGO_TARGET_DIR:-target}/debug
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for bin in trestle-irc trestle-xmpp trestle-sms examples/echo; do
  name=$(basename "$bin"); name=${name#trestle-}
  exe="$target/$bin"
  [ -x "$exe" ] || { echo "missing $exe" >&2; exit 1; }
  "$exe" example-config > "config/$name.example.yaml"
  "$exe" generate-registration -c "config/$name.example.yaml" -o "$tmp/$name.yaml" --force > /dev/null
  # Tokens are random: the committed example shows placeholders.
  sed -E 's/^(as_token|hs_token): .*/\1: CHANGE_ME_generated_by_generate-registration/' \
    "$tmp/$name.yaml" > "registration/$name.example.yaml"
  echo "regenerated config/$name.example.yaml and registration/$name.example.yaml"
done
