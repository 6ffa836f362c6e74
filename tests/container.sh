#!/usr/bin/env bash
# The demo in Docker, end to end: build the image, train the demo model briefly, serve it, and ask it for one
# completion with the openai client. Exits non-zero unless the client prints text. Not part of `make test`
# (it downloads the requirements into the image and takes minutes): run `bash tests/container.sh` or `make container`.
#
#   BASE_IMAGE=python:3.11-slim       the Dockerfile's base (default), from Docker Hub
#   BASE_IMAGE=debootstrap            no registry needed: a Debian base made here with debootstrap (as root), which
#                                     also carries this machine's CA bundle ($PIP_CERT) for pip behind a TLS proxy
#   TORCH_WHEELS=/dir                 a folder holding torch's CPU wheel, served to the build from this machine
#                                     (when download.pytorch.org is out of reach)
#   TRAIN_ARGS=--max_iters=30         the training's length here (the demo's own is 3 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
compose() { if docker compose version >/dev/null 2>&1; then docker compose "$@"; else docker-compose "$@"; fi; }

if [ "${BASE_IMAGE:-}" = debootstrap ]; then
  BASE_IMAGE=nanodeepseek-base:bookworm
  if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
      http://deb.debian.org/debian
    cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$rootfs/etc/ssl/certs/build-ca.crt"
    tar -C "$rootfs" -c . | docker import --change 'ENV PIP_CERT=/etc/ssl/certs/build-ca.crt' - "$BASE_IMAGE"
    rm -rf "$rootfs"
  fi
fi
if [ -n "${TORCH_WHEELS:-}" ]; then  # a one-off web server on the docker bridge, for the build's pip
  bridge=$(ip -4 -o addr show docker0 | awk '{print $4}' | cut -d/ -f1)  # this machine, seen from a container
  port=$(python3 -c "import socket; s = socket.socket(); s.bind(('$bridge', 0)); print(s.getsockname()[1])")
  python3 -m http.server "$port" --bind "$bridge" --directory "$TORCH_WHEELS" >/dev/null 2>&1 &
  server=$!
  trap 'kill $server' EXIT
  export TORCH_INDEX="--find-links http://$bridge:$port/ --trusted-host $bridge"
fi
export BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim} TRAIN_ARGS=${TRAIN_ARGS:---max_iters=30 --eval_interval=30}
export SERVE_API_KEY=${SERVE_API_KEY:-container-check}
project=nanodeepseek-check
compose -p $project build
status=0
# train runs to completion before serve starts (depends_on); the client's status is the check's
compose -p $project up --detach serve && compose -p $project run --rm client || status=$?
if [ $status -ne 0 ]; then
  compose -p $project logs --tail=20 >&2 || true
  echo "error: the container check failed (status $status): the client got no text" >&2
fi
compose -p $project down --volumes >/dev/null 2>&1 || true
exit $status
