# shellcheck shell=bash
# Shared helpers for petri's host scripts (bootstrap, up, down, test, bench). Source it:
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Everything that touches podman runs as the unprivileged service user (rootless
# podman), never as root, so all such calls go through `as_user`.
#
# Two slots, each a staged copy of the checkout, a venv and sandbox images of its own, so
# that a test run never replaces what a running service uses:
#   service (scripts/up, bootstrap): ~USER/src, ~USER/venv, localhost/petri-sandbox:PROFILE
#   test (scripts/test, scripts/bench): ~USER/test-src, ~USER/test-venv,
#                                       localhost/petri-test-sandbox:PROFILE
# PETRI_SLOT picks one (default service); PETRI_IMAGE_REPOSITORY overrides the images'.

PETRI_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # the checkout this file lives in
PETRI_USER="${PETRI_USER:-petri}"
PETRI_SLOT="${PETRI_SLOT:-service}"
export PETRI_REPO PETRI_USER PETRI_SLOT

log() { printf '[petri] %s\n' "$*" >&2; }
die() { printf '[petri] error: %s\n' "$*" >&2; exit 1; }

case "$PETRI_SLOT" in
  service) ;;
  test) export PETRI_IMAGE_REPOSITORY="${PETRI_IMAGE_REPOSITORY:-localhost/petri-test-sandbox}" ;;
  *) die "PETRI_SLOT must be service or test, not '$PETRI_SLOT'" ;;
esac

# quietly CMD...: run CMD with its output kept aside; show the tail only if it fails.
quietly() {
  local out rc=0; out="$(mktemp)"
  "$@" >"$out" 2>&1 || rc=$?
  ((rc == 0)) || { tail -n 40 "$out" >&2; log "failed ($rc): $*"; }
  rm -f "$out"; return "$rc"
}

# Sets PETRI_HOME, PETRI_UID, PETRI_SRC, PETRI_VENV (the slot's), PETRI_STATE (scripts/up's
# controller: its log and pid file), PETRI_USER_RUNTIME_DIR from the passwd entry. Called
# below; call again after creating the user.
petri_load_user() {
  local entry
  if entry="$(getent passwd "$PETRI_USER")"; then
    PETRI_UID="$(cut -d: -f3 <<<"$entry")"
    PETRI_HOME="$(cut -d: -f6 <<<"$entry")"
  else
    PETRI_UID=""
    PETRI_HOME="/home/$PETRI_USER"
  fi
  if [[ "$PETRI_SLOT" == test ]]; then
    PETRI_SRC="$PETRI_HOME/test-src" PETRI_VENV="$PETRI_HOME/test-venv"
  else
    PETRI_SRC="$PETRI_HOME/src" PETRI_VENV="$PETRI_HOME/venv"
  fi
  PETRI_STATE="$PETRI_HOME/.local/state/petri"
  PETRI_USER_RUNTIME_DIR="${PETRI_UID:+/run/user/$PETRI_UID}"
  export PETRI_UID PETRI_HOME PETRI_SRC PETRI_VENV PETRI_STATE PETRI_USER_RUNTIME_DIR
}
petri_load_user

# The pid of the controller scripts/up started, if it is running (and not a recycled pid).
service_pid() {
  local pid
  pid="$(cat "$PETRI_STATE/controller.pid" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" |
    grep -q -- '-m controller' && printf '%s\n' "$pid"
}

# stage_source DEST: a fresh copy of the checkout at DEST, owned by the service user (CI's
# clone may sit under root's home, which is 0700). Built beside DEST and swapped in; tar
# because rsync may be missing. Whatever runs from DEST loses its files: callers make sure
# nothing does.
stage_source() {
  local dest="$1"
  as_user rm -rf "$dest.new" "$dest.old"
  as_user mkdir "$dest.new"
  tar -C "$PETRI_REPO" -cf - --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude=.mypy_cache --exclude=.pytest_cache --exclude=.ruff_cache --exclude='*.egg-info' . |
    as_user tar -C "$dest.new" -xf -
  if [[ -d "$dest" ]]; then as_user mv "$dest" "$dest.old"; fi
  as_user mv "$dest.new" "$dest"
  as_user rm -rf "$dest.old"
}

# One scripts/test or scripts/bench at a time: they share the test slot. Waits for the other.
# The lock is fd 9 of this shell: run children with `9>&-`, or a long-lived process they start
# (podman's rootless pause process) would hold it for ever.
lock_test_slot() {
  local lock="/run/lock/petri-$PETRI_USER-test.lock"
  exec 9>>"$lock"
  if ! flock -n 9; then
    log "waiting for another scripts/test or scripts/bench to finish ($lock)"
    flock 9
  fi
}

# A user without a login session has no XDG_RUNTIME_DIR, which rootless podman
# needs. /run is a tmpfs, so this must be re-checked after every reboot.
ensure_runtime_dir() {
  [[ -n "$PETRI_UID" ]] || die "user $PETRI_USER does not exist (run scripts/bootstrap)"
  install -d -m 0700 -o "$PETRI_UID" -g "$(id -g "$PETRI_USER")" "$PETRI_USER_RUNTIME_DIR"
}

# as_user CMD [ARGS...]: run CMD as the service user from its home, with a clean
# environment: HOME, XDG_RUNTIME_DIR, a PATH that starts with the slot's venv's bin, and
# the caller's PIP_*, PETRI_*, CA-bundle, proxy, locale and CI variables (so pip
# reaches PyPI the same way root does). Extra variables: as_user env FOO=1 CMD.
as_user() {
  [[ -n "$PETRI_UID" ]] || die "user $PETRI_USER does not exist (run scripts/bootstrap)"
  local -a pass=() ; local name
  while IFS= read -r name; do
    pass+=("$name=${!name}")
  done < <(compgen -e | grep -E '^(PIP_|PETRI_|SSL_CERT_(FILE|DIR)$|REQUESTS_CA_BUNDLE$|CURL_CA_BUNDLE$|(https?|no|all)_proxy$|(HTTPS?|NO|ALL)_PROXY$|LANG$|LC_|TZ$|TERM$|CI$)' || true)
  ( cd "$PETRI_HOME" && exec runuser -u "$PETRI_USER" -- env -i "${pass[@]}" \
      HOME="$PETRI_HOME" USER="$PETRI_USER" LOGNAME="$PETRI_USER" \
      XDG_RUNTIME_DIR="$PETRI_USER_RUNTIME_DIR" \
      PATH="$PETRI_VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      "$@" )
}

# in_src CMD [ARGS...]: as_user, in DIR (default the slot's staged copy), with that copy's code
# first on the import path (client/ holds the `petri` package), whatever the venv installed.
in_src() {
  local dir="$PETRI_SRC"
  if [[ "$1" == -C ]]; then dir="$2"; shift 2; fi
  as_user env -C "$dir" PYTHONPATH="$PETRI_SRC:$PETRI_SRC/client" "$@"
}
