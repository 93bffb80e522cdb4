#!/usr/bin/env bash
# Bring this machine (a Lightning AI studio, a rented GPU box, a systemd service) up as a gridfleet worker:
#   1. clone the repo, or update the checkout (fast-forward only: local changes are kept, never clobbered),
#   2. make .venv and install gridfleet, torch==2.13.0 pinned first (the CUDA build on a GPU machine),
#      skipped when pyproject.toml has not changed since the last install,
#   3. exec `gridfleet worker`, which reads GRIDFLEET_SERVER_URL, GRIDFLEET_TOKEN, HF tokens, ... from .env.
#
# Settings, from the environment or the checkout's .env (the environment wins; `gridfleet studios up` exports
# the first two for each studio it starts):
#   GRIDFLEET_WORKER_NAME   the worker's name (default: the host name); `studios up` uses the studio's name
#   GRIDFLEET_MAX_RUN_TIME  seconds this worker may run (free hours); its job is checkpointed before the end
#   GRIDFLEET_WORKER_ARGS   more `gridfleet worker` options, e.g. "--trainers gated_rnn --grace 60"
#   GRIDFLEET_REPO_URL      where to clone from when there is no checkout yet
#   GRIDFLEET_REF           the branch or tag to follow (default: main); GRIDFLEET_UPDATE=0 skips the update
#   GRIDFLEET_DIR           the checkout (default: the one holding this script, else ./gridfleet)
#   GRIDFLEET_VENV          the virtualenv (default: $GRIDFLEET_DIR/.venv); GRIDFLEET_PYTHON makes it (python3)
#   GRIDFLEET_BOOTSTRAP_ONLY=1  install and stop, without starting the worker
set -euo pipefail

log() { echo "studio_bootstrap: $*" >&2; }

# KEY=value lines of a .env file, exported unless the environment already has the key. Values are never echoed.
load_env() {
  local file=$1 line key value
  [ -f "$file" ] || return 0
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%$'\r'}
    case "$line" in '' | '#'*) continue ;; esac
    line=${line#export }
    key=${line%%=*}
    key=${key//[[:space:]]/}
    value=${line#*=}
    [[ "$line" == *=* && "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    value=${value#"${value%%[![:space:]]*}"}
    if [[ "$value" == \"* ]]; then value=${value#\"}; value=${value%%\"*}
    elif [[ "$value" == \'* ]]; then value=${value#\'}; value=${value%%\'*}
    else value=${value%%[[:space:]]#*}; value=${value%"${value##*[![:space:]]}"}  # `KEY=v  # comment`, as dotenv
    fi
    [ -n "${!key+set}" ] || export "$key=$value"
  done < "$file"
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${GRIDFLEET_DIR:-}" ]; then
  if [ -f "$here/../pyproject.toml" ] && grep -q '^name = "gridfleet"' "$here/../pyproject.toml"; then
    GRIDFLEET_DIR=$(cd "$here/.." && pwd)
  else  # a copy of this script on its own: the checkout goes below the current directory
    load_env "$PWD/.env"
    GRIDFLEET_DIR=${GRIDFLEET_DIR:-$PWD/gridfleet}
  fi
fi
load_env "$GRIDFLEET_DIR/.env"
ref=${GRIDFLEET_REF:-main}

# 1. the code
if [ ! -d "$GRIDFLEET_DIR/.git" ]; then
  if [ -z "${GRIDFLEET_REPO_URL:-}" ]; then
    log "no checkout at $GRIDFLEET_DIR and no GRIDFLEET_REPO_URL to clone"
    exit 2
  fi
  log "cloning into $GRIDFLEET_DIR ($ref)"
  git clone --quiet --branch "$ref" "$GRIDFLEET_REPO_URL" "$GRIDFLEET_DIR"
elif [ "${GRIDFLEET_UPDATE:-1}" != 0 ]; then
  remote=${GRIDFLEET_REPO_URL:-origin}
  if git -C "$GRIDFLEET_DIR" fetch --quiet "$remote" "$ref" \
      && git -C "$GRIDFLEET_DIR" merge --quiet --ff-only FETCH_HEAD; then
    log "code at $(git -C "$GRIDFLEET_DIR" rev-parse --short HEAD) ($ref)"
  else
    log "could not fast-forward to $ref (offline, or local changes); starting with the code as it is"
  fi
fi
cd "$GRIDFLEET_DIR"
load_env .env  # a .env that came with the clone

# 2. the environment
venv=${GRIDFLEET_VENV:-$GRIDFLEET_DIR/.venv}
[ -x "$venv/bin/python" ] || "${GRIDFLEET_PYTHON:-python3}" -m venv "$venv"
stamp="$venv/.gridfleet-installed"
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  log "installing into $venv (torch==2.13.0 first)"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q -e .
  echo "$wanted" > "$stamp"
fi
if [ "${GRIDFLEET_BOOTSTRAP_ONLY:-0}" = 1 ]; then
  log "installed; not starting a worker (GRIDFLEET_BOOTSTRAP_ONLY=1)"
  exit 0
fi

# 3. the worker (exec: SIGTERM from systemd or the studio reaches the agent, which checkpoints its job)
args=(worker --name "${GRIDFLEET_WORKER_NAME:-$(hostname)}")
[ -n "${GRIDFLEET_MAX_RUN_TIME:-}" ] && args+=(--max-run-time "$GRIDFLEET_MAX_RUN_TIME")
# shellcheck disable=SC2206 - word splitting of the extra options is intended
[ -n "${GRIDFLEET_WORKER_ARGS:-}" ] && args+=($GRIDFLEET_WORKER_ARGS)
log "starting gridfleet worker ${args[2]}"  # not the extra options: they may hold a token
exec "$venv/bin/gridfleet" "${args[@]}"
