# shellcheck shell=bash
# Shared helpers for petri's host scripts (bootstrap, up, test). Source it:
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Everything that touches podman runs as the unprivileged service user (rootless
# podman), never as root, so all such calls go through `as_user`.

PETRI_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # the checkout this file lives in
PETRI_USER="${PETRI_USER:-petri}"
export PETRI_REPO PETRI_USER

log() { printf '[petri] %s\n' "$*" >&2; }
die() { printf '[petri] error: %s\n' "$*" >&2; exit 1; }

# quietly CMD...: run CMD with its output kept aside; show the tail only if it fails.
quietly() {
  local out rc=0; out="$(mktemp)"
  "$@" >"$out" 2>&1 || rc=$?
  ((rc == 0)) || { tail -n 40 "$out" >&2; log "failed ($rc): $*"; }
  rm -f "$out"; return "$rc"
}

# Sets PETRI_HOME, PETRI_UID, PETRI_SRC, PETRI_VENV, PETRI_USER_RUNTIME_DIR from the
# passwd entry. Called below; call again after creating the user.
petri_load_user() {
  local entry
  if entry="$(getent passwd "$PETRI_USER")"; then
    PETRI_UID="$(cut -d: -f3 <<<"$entry")"
    PETRI_HOME="$(cut -d: -f6 <<<"$entry")"
  else
    PETRI_UID=""
    PETRI_HOME="/home/$PETRI_USER"
  fi
  PETRI_SRC="$PETRI_HOME/src"
  PETRI_VENV="$PETRI_HOME/venv"
  PETRI_USER_RUNTIME_DIR="${PETRI_UID:+/run/user/$PETRI_UID}"
  export PETRI_UID PETRI_HOME PETRI_SRC PETRI_VENV PETRI_USER_RUNTIME_DIR
}
petri_load_user

# A user without a login session has no XDG_RUNTIME_DIR, which rootless podman
# needs. /run is a tmpfs, so this must be re-checked after every reboot.
ensure_runtime_dir() {
  [[ -n "$PETRI_UID" ]] || die "user $PETRI_USER does not exist (run scripts/bootstrap)"
  install -d -m 0700 -o "$PETRI_UID" -g "$(id -g "$PETRI_USER")" "$PETRI_USER_RUNTIME_DIR"
}

# as_user CMD [ARGS...]: run CMD as the service user from its home, with a clean
# environment: HOME, XDG_RUNTIME_DIR, a PATH that starts with the venv's bin, and
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
