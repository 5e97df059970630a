"""Constants and helpers tests import by name (conftest.py files are not importable by name once
several folders have one)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAIT_LIMIT_S = 60.0  # upper bound on any wait for a condition; reaching it is a failure


def loom_cli(*args: str) -> list[str]:
    return ['-m', 'loom_ros.cli', *args]
