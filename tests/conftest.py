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

# The slowest files first: `make test` hands whole files to two processes (pytest-xdist, --dist loadfile)
# in this order, and the longest first keeps one process from running a long file alone at the end.
# From `pytest --durations=0` (docs/benchmarks.md, "The test suite's wall time"), slowest first.
SLOWEST_FIRST = ("test_pipeline_local.py", "test_pipeline_retrain.py", "test_fid.py", "test_image_venv.py",
                 "test_model_env.py", "test_mlflow_spool.py", "test_mlflow_postgres.py", "test_registry.py",
                 "test_evaluate.py", "test_preemption.py", "test_mlflow_user.py", "test_sharded_checkpoint.py",
                 "test_launcher.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order
