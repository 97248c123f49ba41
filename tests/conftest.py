"""Shared test set-up: every test run builds into its own fresh kernel cache."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Set before gradc builds anything, so that no test reads or writes the user's cache.
_CACHE = tempfile.mkdtemp(prefix="gradc-test-cache-")
os.environ["GRADC_CACHE_DIR"] = _CACHE

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def examples_path():
    """Make ``examples/`` importable, so tests use the very kernels the examples define."""
    sys.path.insert(0, str(EXAMPLES))
    yield EXAMPLES
    sys.path.remove(str(EXAMPLES))
