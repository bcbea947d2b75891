#!/usr/bin/env bash
# build.sh PROFILE: build localhost/petri-sandbox:PROFILE without a container
# registry. Run it as the user who runs the sandboxes (rootless podman keeps
# images per user). Steps, each cached:
#   1. base: a Debian trixie rootfs (python3.13) from mmdebstrap, imported
#      once as localhost/petri-base:trixie;
#   2. wheels: downloaded on the host for cp313/manylinux into a persistent
#      cache (pip in the image has no CA, so the image build stays offline);
#   3. image: podman build from a temp context (wheels/ + code/), skipped when
#      an image with the same input hash exists.
# env: PYTHON (python with pip for the downloads, default python3),
#      XDG_CACHE_HOME (cache root, default ~/.cache).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
profile="${1:?usage: build.sh PROFILE (profiles/PROFILE.txt)}"
log() { printf '[build.sh %s] %s\n' "$profile" "$*" >&2; }
die() { log "error: $*"; exit 1; }
[[ -f "$here/profiles/$profile.txt" ]] || die "no profile $here/profiles/$profile.txt"

SUITE=trixie PY_VERSION=3.13 PY_TAG=cp313 GLIBC_MINOR=41   # what trixie ships
BASE="localhost/petri-base:$SUITE"
IMAGE="localhost/petri-sandbox:$profile"
PYTHON="${PYTHON:-python3}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/petri"
wheels="$cache/wheels/$profile"
mkdir -p "$wheels"
work="$(mktemp -d)"          # logs and the base tarball; the build context is $ctx
trap 'rm -rf "$work"' EXIT
ctx="$work/ctx"
mkdir -p "$ctx/wheels" "$ctx/code"
podman() { command podman "$@" 2> >(grep -v 'is not a shared mount' >&2); }  # benign warning here

# --- 1. Base rootfs: mmdebstrap's unshare mode needs no root (only the
# user's subordinate ids). Minbase plus python; no docs, no apt lists. -------
if ! podman image exists "$BASE"; then
  t0=$SECONDS
  # The Debian mirror this host uses (deb822 or one-line sources).
  uri() { { grep -rhoE "https?://[^[:space:]]+/$1/?([[:space:]]|$)" /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true; } |
          head -1 | tr -d '[:space:]' | sed 's:/$::'; }
  mirror="$(uri debian)"; mirror="${mirror:-http://deb.debian.org/debian}"
  security="$(uri debian-security)"; security="${security:-http://deb.debian.org/debian-security}"
  log "building $BASE with mmdebstrap from $mirror (~20 s)"
  mmdebstrap --mode=unshare --variant=minbase --format=tar \
    --include=python3,python3-venv,ca-certificates,tini \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$SUITE" "$work/base.tar" \
    "deb $mirror $SUITE main" "deb $mirror $SUITE-updates main" "deb $security $SUITE-security main" \
    >"$work/mmdebstrap.log" 2>&1 || { tail -30 "$work/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
  podman import -q "$work/base.tar" "$BASE" >/dev/null
  rm -f "$work/base.tar"
  log "base built in $((SECONDS - t0)) s"
fi

# --- 2. Wheels for the image's Python. profiles/PROFILE.txt: exact pins with
# binary wheels. profiles/PROFILE.sdist.txt (optional): pins published only as
# sdists, built into wheels here (pure-Python ones; a compiled one yields a
# wheel for the host's Python and the offline install below fails loudly).
# First try to resolve from the cache alone; go online only when that fails.
reqs="$ctx/wheels/requirements.txt"
cat "$here/profiles/$profile.txt" > "$reqs"
sdist="$here/profiles/$profile.sdist.txt"
[[ -f "$sdist" ]] && cat "$sdist" >> "$reqs"
platforms=()
for minor in $(seq 17 "$GLIBC_MINOR"); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
fetch() {
  "$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp --abi "$PY_TAG" "${platforms[@]}" \
    --find-links "$wheels" -r "$reqs" "$@"
}
if ! fetch --no-index -d "$ctx/wheels" >/dev/null 2>&1; then
  t0=$SECONDS
  log "downloading wheels into $wheels"
  [[ -f "$sdist" ]] && "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps \
                         --no-binary=:all: -w "$wheels" -r "$sdist"
  fetch -d "$wheels"
  rm -f "$ctx"/wheels/*.whl
  fetch --no-index -d "$ctx/wheels"
  log "wheels downloaded in $((SECONDS - t0)) s"
fi

# --- 3. Code: the executor and the generated protobuf package `petri`. ------
for d in executor protos/petri; do
  [[ -d "$repo/$d" ]] || die "$repo/$d is missing"
done
tar -C "$repo" -cf - --exclude=__pycache__ --exclude='*.pyc' executor |
  tar -C "$ctx/code" -xf -
tar -C "$repo/protos" -cf - --exclude=__pycache__ --exclude='*.pyc' petri |
  tar -C "$ctx/code" -xf -
cp "$here/Containerfile" "$ctx/Containerfile"
# Fixed mtimes: the layers (and .pyc timestamps) then depend on content alone.
find "$ctx" -exec touch -h -d @0 {} +

# --- 4. Build, unless an image with these exact inputs exists. -------------
hash_dir() { (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-64; }
wheels_sha="$(hash_dir "$ctx/wheels")"
inputs="$( { podman image inspect -f '{{.Id}}' "$BASE"; echo "$profile $PY_VERSION"; hash_dir "$ctx"; } | sha256sum | cut -c1-64)"
if [[ "$(podman image inspect -f '{{index .Labels "petri.inputs"}}' "$IMAGE" 2>/dev/null || true)" == "$inputs" ]]; then
  log "$IMAGE is up to date"
  exit 0
fi
t0=$SECONDS
log "building $IMAGE"
podman build --network none --layers -t "$IMAGE" -f "$ctx/Containerfile" \
  --build-arg WHEELS_SHA="$wheels_sha" --build-arg PY_VERSION="$PY_VERSION" \
  --label petri.profile="$profile" --label petri.inputs="$inputs" \
  "$ctx" >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; die "podman build failed"; }
size="$(podman image inspect -f '{{.Size}}' "$IMAGE")"
log "built $IMAGE in $((SECONDS - t0)) s, $((size / 1000000)) MB"
