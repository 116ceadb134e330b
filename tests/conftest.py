"""Shared fixtures: the real data in ../shared/data, unpacked once per machine.

Where ../shared is absent (a user's clone) the tests that need it skip; in CI (the CI service
sets CI=true; .ci/run does not) it must be there, and its absence is a failure, not a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CANON_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = REPO / ".cache" / "test-data"


def _require_shared(path: Path) -> Path:
    if path.exists():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{path} is missing; CI must run with ../shared/data beside the clone")
    pytest.skip(f"{path} not present (set CANON_SHARED_DATA to the shared data folder)")


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """A folder holding `cifar-10-batches-py/` in the standard pickled format (all 60,000)."""
    script = _require_shared(SHARED_DATA / "unpack_cifar10.py")
    done = CACHE / "cifar10" / "cifar-10-batches-py" / "batches.meta"
    if not done.exists():
        subprocess.run([sys.executable, str(script), str(CACHE / "cifar10")], check=True)
    return CACHE / "cifar10"


@pytest.fixture(scope="session")
def imagenette_root() -> Path:
    """1,500 real ImageNet JPEGs in the ImageNet layout: train/<wnid>/, val/<wnid>/."""
    return _require_shared(SHARED_DATA / "imagenette2-160-mini")
