#!/usr/bin/env bash
# The README's commands, run in the install the README says to make: the serving runtime only
# (`make demo`, no torch, no dev tools), in its own virtual environment. CI runs this after the
# test suite; it fails if a newcomer's command would fail.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-var/venv-serve}
BIN=$VENV/bin
make demo VENV="$VENV"                                       # the main job: demo set through the service
"$BIN/python" - <<'PY'
import importlib.util, sys
leaked = [m for m in ("torch", "monai", "pytest") if importlib.util.find_spec(m) is not None]
sys.exit(f"the serving install holds {leaked}" if leaked else 0)
PY
"$BIN/dxassist" models list
"$BIN/dxassist" models verify
rm -rf var/jobs/readme-demo
status=0
"$BIN/dxassist" screen var/store/demo --out var/jobs/readme-demo || status=$?
# exit 1 = done, some studies not screened (the demo set holds a leg, a lateral and bad files)
[ "$status" -eq 1 ] || { echo "dxassist screen --out exited $status, expected 1" >&2; exit 1; }
test -s var/jobs/readme-demo/results.csv && test -s var/jobs/readme-demo/report.html
status=0
"$BIN/dxassist" screen var/store/demo/synthetic/endoscopy --json > /dev/null || status=$?
[ "$status" -eq 0 ] || { echo "dxassist screen (all screenable) exited $status, expected 0" >&2; exit 1; }
echo "README commands: ok"
