#!/bin/sh
# Entry point of the UniCT Node images. Reads the HTTP token from a file when
# UNICT_HTTP_TOKEN_FILE names one (Docker/Compose secrets are files under /run/secrets), so
# the token never has to be written into the container's environment by the orchestrator,
# then runs the command (by default `unict-node serve --config /etc/unict/config.yaml`).
# UNICT_HTTP_TOKEN_FILE has a single underscore on purpose: the settings loader reads every
# UNICT_<SECTION>__<KEY> variable as a config key, and would refuse http.token_file.
set -eu

if [ -n "${UNICT_HTTP_TOKEN_FILE:-}" ]; then
  if [ ! -r "$UNICT_HTTP_TOKEN_FILE" ]; then
    echo "unict-entrypoint: UNICT_HTTP_TOKEN_FILE=$UNICT_HTTP_TOKEN_FILE is not a readable file" >&2
    exit 64
  fi
  # Strip the trailing newline that `echo ... > file` and most editors leave.
  UNICT_HTTP__TOKEN=$(tr -d '\r\n' < "$UNICT_HTTP_TOKEN_FILE")
  export UNICT_HTTP__TOKEN
fi

exec "$@"
