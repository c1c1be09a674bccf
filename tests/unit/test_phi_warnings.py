"""Python warnings never reach stderr or logs verbatim: pydicom's quote element values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UID = "1.2.840.113619.2.55.3.604688119.868.1234567890.123"

_CODE = f"""
import logging, warnings
from pydicom.dataelem import DataElement
from serving.observability.phi import install_logging
install_logging(logging.INFO)
warnings.simplefilter("always")
DataElement(0x0020000D, "UI", "{UID}" + "9" * 40)  # pydicom: "Invalid value for VR UI: '<the UID>'"
warnings.warn("study {UID} of DOE^JOHN looks odd")
logging.getLogger("x").warning("done")
"""


def test_uid_bearing_warnings_are_logged_with_their_text_withheld() -> None:
    out = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, cwd=REPO, check=True)
    stderr = out.stderr
    assert "done" in stderr  # logging works and reached stderr
    assert stderr.count("UserWarning") == 2  # both warnings were logged, by category
    assert "text withheld" in stderr
    assert UID not in stderr and "DOE^JOHN" not in stderr and "1.2.840.113619" not in stderr
    assert UID not in out.stdout
