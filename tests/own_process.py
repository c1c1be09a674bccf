"""Tests marked ``own_process`` run in a child pytest process of their own.

They are the tests whose process becomes a Ray driver (``ray.init``). When the local raylet or
GCS goes away, Ray's core worker ends its driver process at once (``_Exit(1)``): inside the
suite's own process that would end the whole run mid-way, with no summary and no word of which
test or why (a CI run once stopped that way). In a child, such a death fails one test, and the
failure shows the tails of that Ray session's logs (the raylet's, the GCS's and the driver's).

A child that died without reporting any result (the driver ended by Ray, not a test failure) is
run once more and the first death is printed; a child that reported a failure is never rerun.

The test's fixtures are still set up in the suite's process (cheap ones: temporary folders, the
session's servers); a fixture that would start Ray there checks ``in_child()`` first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CHILD_ENV = "DXASSIST_TEST_CHILD"
CHILD_TIMEOUT_S = 900  # above every own_process test's own deadlines
_RESULT = re.compile(r"^=*\s*\d+ (passed|failed|error|errors|skipped)\b.* in [\d.]+s", re.MULTILINE)
_SKIPPED = re.compile(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", re.MULTILINE)


def in_child() -> bool:
    """True in the child process that runs an ``own_process`` test's body."""
    return bool(os.environ.get(CHILD_ENV))


def _ray_log_tails(since: float, lines: int = 25) -> str:
    """The last lines of the Ray logs written since ``since`` (the newest session's)."""
    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    if not logs.is_dir():
        return "(no Ray session logs)"
    out = []
    for pattern in ("raylet.out", "gcs_server.out", "python-core-driver-*.log"):
        for path in sorted(logs.glob(pattern)):
            try:
                if path.stat().st_mtime < since:
                    continue
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(out) or "(no Ray log written during the test)"


def _run_child(item: pytest.Function, basetemp: Path) -> tuple[int, str, float]:
    import time

    started = time.time()
    command = [sys.executable, "-m", "pytest", item.nodeid, "-p", "no:cacheprovider", "-q", f"--basetemp={basetemp}"]
    try:
        proc = subprocess.run(
            command,
            cwd=item.config.rootpath,
            env={**os.environ, CHILD_ENV: "1"},
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
        )
        return proc.returncode, proc.stdout + proc.stderr, started
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(
            f"the test's process was killed after {CHILD_TIMEOUT_S} s (never rerun):\n{text[-8000:]}", pytrace=False
        )


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if pyfuncitem.get_closest_marker("own_process") is None or in_child():
        return None
    for attempt in (1, 2):
        basetemp = Path(tempfile.mkdtemp(prefix="dxassist-child-"))
        try:
            rc, output, started = _run_child(pyfuncitem, basetemp)
        finally:
            shutil.rmtree(basetemp, ignore_errors=True)
        skipped = _SKIPPED.search(output)
        if rc == 0 and skipped and not re.search(r"\b\d+ passed\b", output):
            pytest.skip(skipped.group(1))
        if rc == 0:
            return True
        tail = "\n".join(output.splitlines()[-120:])
        if _RESULT.search(output) or rc == 5:
            pytest.fail(f"the test failed in its own process (exit {rc}):\n{tail}", pytrace=False)
        died = f"the child pytest died without a result (exit {rc}):\n{tail}\n{_ray_log_tails(started)}"
        if attempt == 2:
            pytest.fail(died + "\n(it died on its second run too)", pytrace=False)
        _RERUN.append(f"{pyfuncitem.nodeid}: {died}")
    return True


_RERUN: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Every child that died without a result and was run again, with what its Ray logs said."""
    if _RERUN:
        terminalreporter.section("own_process tests run again after their child died", yellow=True)
        for text in _RERUN:
            terminalreporter.write_line(text)
