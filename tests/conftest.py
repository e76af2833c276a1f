"""Shared fixtures: every module in tests/fixtures/ contributes its public fixtures here."""

import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
# a service that is down is retried this many seconds (maskdit/core/retry.py), not production's 300
os.environ.setdefault("MASKDIT_RETRY_BUDGET_S", "3")

_here = Path(__file__).parent
sys.path.insert(0, str(_here))
for _path in sorted((_here / "fixtures").glob("*.py")):
    if _path.stem.startswith("_"):
        continue
    _module = importlib.import_module(f"fixtures.{_path.stem}")
    globals().update({k: v for k, v in vars(_module).items() if not k.startswith("_")})
