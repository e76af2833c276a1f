"""The comparison in MLflow: one parent run (params, both curves, the plot) that the arms' runs nest under."""

from __future__ import annotations

import os
import time

from maskdit.compare.arms import Arm
from maskdit.compare.config import CompareConfig, EvalPoint
from maskdit.core import storage
from maskdit.core.parent_run import create_parent, finish_parent, parent_tags
from maskdit.core.tracking_server import check_reachable, connect, tracking_uri


class Tracker:
    """The comparison's MLflow parent run, written through the client (the arms' training runs nest under it)."""

    def __init__(self, cfg: CompareConfig):
        uri = tracking_uri(cfg.tracking.uri)
        self.client = self.run_id = None
        if uri is None:
            return
        import mlflow

        uri = connect(uri)
        check_reachable(uri)
        self.client = mlflow.MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.tracking.experiment
        self.run_id = create_parent(self.client, name, cfg.tracking.run_name,
                                    {"maskdit.step": "compare", **parent_tags()})
        from mlflow.entities import Param

        from maskdit.core.config import flatten

        params = [Param(k, str(v)[:6000]) for k, v in storage.redact(flatten(cfg.model_dump(mode="json"))).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def point(self, arm: Arm, p: EvalPoint) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(round(p.wall_s))
        values = {"fid": p.fid, "images_seen": p.images, "train_steps": p.steps,
                  **({"accuracy": p.accuracy} if p.accuracy is not None else {})}
        if arm.run_id:
            self.client.log_batch(arm.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
        self.client.log_batch(self.run_id, metrics=[Metric(f"{arm.name}_{k}", float(v), now, step)
                                                    for k, v in values.items()])

    def finish(self, files: list[str], status: str) -> None:
        if self.client is None:
            return
        for path in files:
            self.client.log_artifact(self.run_id, path)
        finish_parent(self.client, self.run_id, status)
