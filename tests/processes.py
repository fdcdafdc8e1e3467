"""The installed `hubmerge` command in a child process, for tests of `--num-processes` (not a test module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def hubmerge_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `hubmerge ARGS`; one thread per torch process, since a process group shares the cores."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("hubmerge")), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
