#!/usr/bin/env bash
# Work on the ggml_patch/ series in a real llama.cpp tree.
#   scripts/patches.sh init DIR    pristine pinned llama.cpp in DIR as a git repo (commit "pristine"), with
#                                  ggml_patch/*.patch applied on top as one commit each
#   scripts/patches.sh export DIR  regenerate ggml_patch/ from the commits after "pristine" in DIR
#   scripts/patches.sh check       apply the series to a fresh copy of the pristine tree (patch -p1, no fuzz)
# One concern per commit: the commit subject becomes the patch file name.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-}
py=${PYTHON:-python3}
pristine() { (cd "$here" && "$py" -c 'from hlwq_gguf import upstream; print(upstream.pristine_tree())'); }

case "$cmd" in
  init)
    dir=${2:?usage: $0 init DIR}
    [ -e "$dir" ] && { echo "$dir exists" >&2; exit 1; }
    src=$(pristine)
    cp -r "$src" "$dir"
    rm -f "$dir/.hlwq-pristine"
    git -C "$dir" init -q
    git -C "$dir" add -A -f
    git -C "$dir" -c user.name=hlwq-gguf -c user.email=hlwq-gguf@localhost commit -qm pristine
    for p in "$here"/ggml_patch/*.patch; do
      [ -e "$p" ] || continue
      git -C "$dir" -c user.name=hlwq-gguf -c user.email=hlwq-gguf@localhost am -q --keep-cr "$p"
    done
    git -C "$dir" log --oneline
    ;;
  export)
    dir=${2:?usage: $0 export DIR}
    base=$(git -C "$dir" rev-list --max-parents=0 HEAD)
    [ -z "$(git -C "$dir" status --porcelain)" ] || { echo "$dir has uncommitted changes" >&2; exit 1; }
    rm -f "$here"/ggml_patch/*.patch
    git -C "$dir" format-patch -q --zero-commit --no-signature --no-stat --full-index -o "$here/ggml_patch" "$base..HEAD"
    ls "$here/ggml_patch"
    ;;
  check)
    src=$(pristine)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    cp -r "$src"/. "$tmp"/
    for p in "$here"/ggml_patch/*.patch; do
      out=$(cd "$tmp" && patch -p1 --forward --batch < "$p") || { echo "$out"; echo "FAILED: $(basename "$p")" >&2; exit 1; }
      if grep -qE "offset|fuzz" <<<"$out"; then echo "$out"; echo "NOT CLEAN: $(basename "$p")" >&2; exit 1; fi
      echo "ok: $(basename "$p")"
    done
    ;;
  *)
    sed -n '2,8p' "$0"; exit 2 ;;
esac
