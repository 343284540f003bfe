"""Fixtures: a run folder with a non-private and a DP run."""

from __future__ import annotations

from pathlib import Path

import pytest
from _histories import make_history, write_run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """nonprivate (10 s rounds) and dp (15 s rounds, epsilon r + k) runs of 3 rounds."""
    write_run(tmp_path, "nonprivate", make_history("nonprivate", wall=10.0))
    write_run(tmp_path, "dp", make_history("dp-sgd", private=True, wall=15.0))
    return tmp_path
