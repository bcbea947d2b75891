#!/usr/bin/env bash
# build.sh PROFILE: build localhost/petri-sandbox:PROFILE without a container
# registry. Run it as the user who runs the sandboxes (rootless podman keeps
# images per user). Steps, each cached:
#   1. base: a Debian trixie rootfs (python3.13) from mmdebstrap, imported
#      once as localhost/petri-base:trixie;
#   2. wheels: downloaded (and built, for sdist-only pins) on the host for
#      cp313/manylinux into a persistent cache per profile (pip in the image
#      has no CA, so the image build stays offline);
#   3. image: podman build from a temp context (wheels/ + code/), skipped when
#      an image with the same input hash exists. The build installs the wheels
#      offline with pip's resolver, fails if `pip check` reports a problem, and
#      writes /opt/petri/manifest.json; the image also carries that manifest as
#      the label io.petri.manifest.
#   4. the ID-mapped copy: sandboxes run in a user namespace whose root is the
#      first subordinate id (the controller's --userns-size, PETRI_USERNS_SIZE),
#      and rootless overlay cannot map ids at mount time, so podman makes one
#      chowned copy of the image for that mapping, shared by every sandbox.
#      Made here, once, so that no CreateSandbox waits for it.
# env: PYTHON (python with pip for the downloads, default python3),
#      XDG_CACHE_HOME (cache root, default ~/.cache),
#      PETRI_USERNS_SIZE (default 65536, as the controller's),
#      PETRI_IMAGE_REPOSITORY (default localhost/petri-sandbox).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
profile="${1:?usage: build.sh PROFILE (profiles/PROFILE.txt)}"
log() { printf '[build.sh %s] %s\n' "$profile" "$*" >&2; }
die() { log "error: $*"; exit 1; }
[[ -f "$here/profiles/$profile.txt" ]] || die "no profile $here/profiles/$profile.txt"

SUITE=trixie PY_VERSION=3.13 PY_TAG=cp313 GLIBC_MINOR=41   # what trixie ships
# Debian packages of the base. profiles/PROFILE.debs.txt (optional) adds some
# (system libraries that wheels expect from the OS); such a profile gets a base
# of its own, rebuilt when its package list changes.
DEBS=python3,python3-venv,ca-certificates,tini
BASE="localhost/petri-base:$SUITE"
debs_file="$here/profiles/$profile.debs.txt"
if [[ -f "$debs_file" ]]; then
  extra="$(grep -oE '^[^#[:space:]]+' "$debs_file" | paste -sd, -)"
  [[ -n "$extra" ]] && DEBS="$DEBS,$extra" BASE="localhost/petri-base:$SUITE-$profile"
fi
# PETRI_IMAGE_REPOSITORY: another repository, e.g. for a test run beside the service's images.
IMAGE="${PETRI_IMAGE_REPOSITORY:-localhost/petri-sandbox}:$profile"
PYTHON="${PYTHON:-python3}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/petri"
wheels="$cache/wheels/$profile"
mkdir -p "$wheels"
work="$(mktemp -d)"          # logs and the base tarball; the build context is $ctx
trap 'rm -rf "$work"' EXIT
ctx="$work/ctx"
mkdir -p "$ctx/wheels" "$ctx/code"
podman() { command podman "$@" 2> >(grep -v 'is not a shared mount' >&2); }  # benign warning here
started=$SECONDS

# progress LABEL LOGFILE CMD...: run CMD with its output in LOGFILE; every 30 s
# print the elapsed time and the log's last line, so long steps show progress.
# On failure, show the log's tail.
progress() {
  local label="$1" logfile="$2" t0=$SECONDS pid rc=0 n=0 last
  shift 2
  "$@" >"$logfile" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if (( ++n % 30 == 0 )); then
      last="$(tail -n 1 "$logfile" 2>/dev/null | tr -d '\r' | cut -c1-110)"
      log "  $label: $((SECONDS - t0)) s${last:+ ... $last}"
    fi
  done
  wait "$pid" || rc=$?
  if ((rc != 0)); then tail -n 40 "$logfile" >&2; log "$label failed ($rc)"; fi
  return "$rc"
}

# --- 1. Base rootfs: mmdebstrap's unshare mode needs no root (only the
# user's subordinate ids). Minbase plus python; no docs, no apt lists. The
# package list is the label petri.debs of the base. -------------------------
if ! podman image exists "$BASE" ||
   { [[ "$BASE" != "localhost/petri-base:$SUITE" ]] &&
     [[ "$(podman image inspect -f '{{index .Labels "petri.debs"}}' "$BASE")" != "$DEBS" ]]; }; then
  t0=$SECONDS
  # The Debian mirror this host uses (deb822 or one-line sources).
  uri() { { grep -rhoE "https?://[^[:space:]]+/$1/?([[:space:]]|$)" /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true; } |
          head -1 | tr -d '[:space:]' | sed 's:/$::'; }
  mirror="$(uri debian)"; mirror="${mirror:-http://deb.debian.org/debian}"
  security="$(uri debian-security)"; security="${security:-http://deb.debian.org/debian-security}"
  log "building $BASE with mmdebstrap from $mirror (~20 s): $DEBS"
  mmdebstrap --mode=unshare --variant=minbase --format=tar \
    --include="$DEBS" \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$SUITE" "$work/base.tar" \
    "deb $mirror $SUITE main" "deb $mirror $SUITE-updates main" "deb $security $SUITE-security main" \
    >"$work/mmdebstrap.log" 2>&1 || { tail -30 "$work/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
  podman import -q --change "LABEL petri.debs=$DEBS" "$work/base.tar" "$BASE" >/dev/null
  rm -f "$work/base.tar"
  log "base built in $((SECONDS - t0)) s"
fi

# --- 2. Wheels for the image's Python. profiles/PROFILE.txt: the profile's
# exact pins. profiles/PROFILE.sdist.txt (optional): pins published only as
# sdists (they may be in PROFILE.txt too), built into wheels here. Only
# pure-Python ones can be: a compiled one would give a wheel for the host's
# Python, so that is refused. First try to resolve from the cache alone; go
# online only when that fails.
reqs="$ctx/wheels/requirements.txt"
cat "$here/profiles/$profile.txt" > "$reqs"
sdist="$here/profiles/$profile.sdist.txt"
[[ -f "$sdist" ]] && cat "$sdist" >> "$reqs"
platforms=()
for minor in $(seq 17 "$GLIBC_MINOR"); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
# Last (least preferred): manylinux2014, which pip widens to manylinux2010 and
# manylinux1, for wheels tagged only with those (libclang 18.1.1).
platforms+=(--platform manylinux2014_x86_64)
fetch() {
  "$PYTHON" -m pip download --disable-pip-version-check --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp --abi "$PY_TAG" "${platforms[@]}" \
    --find-links "$wheels" -r "$reqs" "$@"
}
if ! fetch -q --no-index -d "$ctx/wheels" >/dev/null 2>&1; then
  t0=$SECONDS
  log "downloading wheels into $wheels ($(grep -oE '^[^#[:space:]]+' "$reqs" | sort -u | wc -l) pins; progress every 30 s)"
  if [[ -f "$sdist" ]]; then
    mkdir -p "$work/sdist"
    progress "building wheels from sdists" "$work/sdist.log" \
      "$PYTHON" -m pip wheel --disable-pip-version-check --no-deps --no-binary=:all: \
      -w "$work/sdist" -r "$sdist" || die "pip wheel failed"
    for whl in "$work"/sdist/*.whl; do
      [[ "$whl" == *-none-any.whl ]] ||
        die "$(basename "$whl") is not pure Python: it needs a build for Python $PY_VERSION, which this host's pip cannot make"
    done
    mv "$work"/sdist/*.whl "$wheels"/
    log "  built $(grep -cE '^[^#[:space:]]' "$sdist") wheels from sdists in $((SECONDS - t0)) s"
  fi
  progress "pip download" "$work/download.log" fetch --progress-bar off -d "$wheels" ||
    die "pip download failed (a pin with no $PY_TAG manylinux wheel? see DEVIATIONS.md)"
  rm -f "$ctx"/wheels/*.whl
  fetch -q --no-index -d "$ctx/wheels" >/dev/null
  log "wheels ready in $((SECONDS - t0)) s: $(du -sh "$wheels" | cut -f1) in the cache"
fi
log "$(find "$ctx/wheels" -name '*.whl' | wc -l) wheels, $(du -sh "$ctx/wheels" | cut -f1)"
# `pip check` problems accepted for this profile (each documented in DEVIATIONS.md).
allow="$here/profiles/$profile.pip-check-allow.txt"
if [[ -f "$allow" ]]; then cp "$allow" "$ctx/wheels/pip-check-allow.txt"; else : > "$ctx/wheels/pip-check-allow.txt"; fi
cp "$here/manifest.py" "$ctx/wheels/manifest.py"

# --- 3. Code: the executor, the generated protobuf package `petri`, and the
# interpreter-wide import fix in site/ (see site/petri_import_order.py). ----
for d in executor client/petri; do
  [[ -d "$repo/$d" ]] || die "$repo/$d is missing"
done
tar -C "$repo" -cf - --exclude=__pycache__ --exclude='*.pyc' executor |
  tar -C "$ctx/code" -xf -
# The contract only: the SDK, CLI and MCP server are for clients, not for the sandbox.
tar -C "$repo/client" -cf - --exclude=__pycache__ --exclude='*.pyc' \
    --exclude=petri/sdk --exclude=petri/cli --exclude=petri/mcp petri |
  tar -C "$ctx/code" -xf -
cp "$here"/site/* "$ctx/code/"
cp "$here/Containerfile" "$ctx/Containerfile"
# Fixed mtimes: the layers (and .pyc timestamps) then depend on content alone.
find "$ctx" -exec touch -h -d @0 {} +

# --- 4. Build, unless an image with these exact inputs exists. -------------
# (in parallel: the full profile's wheels are 1.5 GB; the sort restores path order)
hash_dir() { (cd "$1" && find . -type f -print0 | xargs -0 -r -P "$(nproc)" -n 16 sha256sum | LC_ALL=C sort -k 2) |
             sha256sum | cut -c1-64; }
wheels_sha="$(hash_dir "$ctx/wheels")"
inputs="$( { podman image inspect -f '{{.Id}}' "$BASE"; echo "$profile $PY_VERSION $wheels_sha"
             sha256sum < "$ctx/Containerfile"; hash_dir "$ctx/code"; } | sha256sum | cut -c1-64)"
old="$(podman image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
userns_size="${PETRI_USERNS_SIZE:-65536}"
prepare_mapping() {
  local t0=$SECONDS
  podman run --rm --network none --uidmap "0:1:$userns_size" --gidmap "0:1:$userns_size" \
    "$IMAGE" true || die "cannot run $IMAGE in the sandboxes' user namespace (0:1:$userns_size): does user $(id -un) have $userns_size subordinate uids and gids?"
  ((SECONDS - t0 < 2)) || log "made the ID-mapped copy for the sandboxes' user namespace in $((SECONDS - t0)) s"
}
if [[ -n "$old" && "$(podman image inspect -f '{{index .Labels "petri.inputs"}}' "$IMAGE")" == "$inputs" ]]; then
  prepare_mapping
  log "$IMAGE is up to date ($((SECONDS - started)) s)"
  exit 0
fi
t0=$SECONDS
log "building $IMAGE (layers are cached: a code change rebuilds only the code layer)"
progress "podman build" "$work/build.log" \
  podman build --network none --layers --iidfile "$work/iid" -f "$ctx/Containerfile" \
    --build-arg WHEELS_SHA="$wheels_sha" --build-arg PY_VERSION="$PY_VERSION" \
    --build-arg PROFILE="$profile" --build-arg BASE="$BASE" \
    --label petri.profile="$profile" --label petri.inputs="$inputs" \
    "$ctx" || die "podman build failed"
# The manifest the build wrote, also as a label (compact JSON, a few KB), so
# that `podman image inspect` answers without starting a container.
manifest="$(podman run --rm --network none "$(cat "$work/iid")" cat /opt/petri/manifest.json)"
mkdir "$work/label"
printf 'FROM %s\n' "$(cat "$work/iid")" > "$work/label/Containerfile"
podman build --network none -q -t "$IMAGE" --label io.petri.manifest="$manifest" \
  "$work/label" >/dev/null || die "labelling $IMAGE failed"
# The image this one replaces, unless something still uses it.
if [[ -n "$old" && "$old" != "$(podman image inspect -f '{{.Id}}' "$IMAGE")" ]]; then
  podman rmi "$old" >/dev/null 2>&1 || true
fi
prepare_mapping
size="$(podman image inspect -f '{{.Size}}' "$IMAGE")"
log "built $IMAGE in $((SECONDS - t0)) s ($((SECONDS - started)) s in all), $((size / 1000000)) MB, $("$PYTHON" -c 'import json, sys; print(len(json.loads(sys.argv[1])["packages"]))' "$manifest") distributions"
