#!/usr/bin/env bash
# Runs the test suite. As root with unshare available, the tests run inside a loopback-only
# network namespace: the real servers they start (Orthanc listens on every interface, Ray, DIMSE
# peers, FHIR and MLLP servers) are reachable only on 127.0.0.1 and cannot clash with other ports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ "$(id -u)" = "0" ] && command -v unshare >/dev/null && [ -z "${DXASSIST_NO_NETNS:-}" ]; then
  exec unshare --net --fork bash -c 'ip link set lo up && exec "$0" -m pytest "$@"' "$PY" "$@"
fi
exec $PY -m pytest "$@"
