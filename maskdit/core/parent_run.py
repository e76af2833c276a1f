"""MLflow parent runs: the run that a pipeline run (or a comparison) nests the runs of its steps under.

- nesting: a process's runs nest under the run named by env MASKDIT_PARENT_RUN_ID (`parent_env`
  sets it for a step's work); `tracking_run` records it as the `mlflow.parentRunId` tag, so the
  parent need not be active in that process;
- a parent is created (`create_parent`), or found by a tag such as a pipeline run's `kfp.run_id`
  and created when missing (`find_or_create_parent`), and ended with a status once its children are
  done (`finish_parent`, `finish_parents`);
- children that a killed process left RUNNING are closed, and the parent says why (`close_stale_runs`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from maskdit.core.tracking_server import TrackingError, check_reachable, refusal, tracking_uri

log = logging.getLogger(__name__)
PARENT_RUN_ENV = "MASKDIT_PARENT_RUN_ID"  # the run this process's runs nest under
PARENT_TAG = "mlflow.parentRunId"  # how MLflow records a child's parent


def env_parent() -> str | None:
    """The parent run this process nests its runs under (env MASKDIT_PARENT_RUN_ID); None without one."""
    return os.environ.get(PARENT_RUN_ENV) or None


def parent_env(parent: str | None) -> dict[str, str]:
    """The environment that nests a step's runs under `parent`; empty without one."""
    return {PARENT_RUN_ENV: parent} if parent else {}


def parent_tags() -> dict[str, str]:
    """The tags that nest a run made through the client under this process's parent (`env_parent`)."""
    parent = env_parent()
    return {PARENT_TAG: parent} if parent else {}


def experiment_id(client, name: str) -> str:
    """The id of the MLflow experiment `name`, created when it does not exist yet."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def create_parent(client, experiment: str, run_name: str | None, tags: dict[str, str]) -> str:
    """A new run in `experiment` (created when missing) for other runs to nest under; its id."""
    return client.create_run(experiment_id(client, experiment), run_name=run_name, tags=tags).info.run_id


def find_or_create_parent(experiment: str, tag: str, value: str, run_name: str,
                          tags: dict[str, str] | None = None) -> str | None:
    """The run of `experiment` tagged `tag`=`value`, else a new one with that tag (and `tags`).

    None when no tracking URI is configured (MLFLOW_TRACKING_URI).
    """
    uri = tracking_uri()
    if uri is None:
        return None
    import mlflow

    check_reachable(uri)  # down: waited for within the retry budget, not MLflow's own minutes of retries
    client = mlflow.MlflowClient()
    with _refusal_in_one_line(f"the pipeline run's parent run in the MLflow experiment {experiment!r}"):
        exp_id = experiment_id(client, experiment)
        found = client.search_runs([exp_id], f"tags.`{tag}` = '{value}'", max_results=1)
        if found:
            return found[0].info.run_id
        return client.create_run(exp_id, run_name=run_name, tags={tag: value, **(tags or {})}).info.run_id


@contextmanager
def _refusal_in_one_line(what: str) -> Iterator[None]:
    """MLflow refusing the account (401, 403: docs/operating.md, "MLflow accounts") as a one-line
    `TrackingError`; every other failure as it was."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as error:
        refused = refusal(error, what)
        if refused is None:
            raise
        raise TrackingError(refused) from None


def finish_parent(client, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    """Tag the parent run with `tags`, then end it as `status` (FINISHED, FAILED or KILLED)."""
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)


def finish_parents(experiment: str, tag: str, value: str, status: str,
                   tags: dict[str, str] | None = None) -> list[str]:
    """`finish_parent` every run of `experiment` tagged `tag`=`value`; their ids ([] when not tracking)."""
    uri = tracking_uri()
    if uri is None:
        return []
    import mlflow

    check_reachable(uri)
    client = mlflow.MlflowClient()
    with _refusal_in_one_line(f"closing the pipeline run's parent run in the MLflow experiment {experiment!r}"):
        exp = client.get_experiment_by_name(experiment)
        found = client.search_runs([exp.experiment_id], f"tags.`{tag}` = '{value}'") if exp else []
        for run in found:
            finish_parent(client, run.info.run_id, status, tags)
    return [run.info.run_id for run in found]


def close_stale_runs(parent_run_id: str, reason: str, status: str = "KILLED", *, step: str | None = None,
                     uri: str | None = None) -> list[str]:
    """Mark every child run of `parent_run_id` still RUNNING as `status` (KILLED or FAILED); say why.

    A child is still RUNNING after its process ended when nothing could close it (SIGKILL, the OOM
    killer, a lost node). Each closed child gets the tag `maskdit.closed_reason` = `reason`; the parent
    gets `maskdit.closed_run.<child id>` = "<status>: <reason>". `step` limits this to children tagged
    `maskdit.step=<step>` (a retried step closing its own earlier attempt). Call it when no step of the
    pipeline run is running: a live child would be closed too. A training resumed later reopens its run.
    Returns the closed run ids; [] when not tracking.
    """
    if status not in ("KILLED", "FAILED"):
        raise ValueError(f"status {status!r}: use 'KILLED' or 'FAILED'")
    uri = tracking_uri(uri)
    if uri is None:
        return []
    import mlflow

    check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    if step is not None:
        query += f" and tags.`maskdit.step` = '{step}'"
    stale, token = [], None
    while True:
        page = client.search_runs([experiment], query, max_results=1000, page_token=token)
        stale.extend(run.info.run_id for run in page)
        token = page.token
        if not token:
            break
    note = reason[:5000]  # MLflow limits tag values
    for run_id in stale:
        client.set_tag(run_id, "maskdit.closed_reason", note)
        client.set_terminated(run_id, status=status)
        client.set_tag(parent_run_id, f"maskdit.closed_run.{run_id}", f"{status}: {note}")
        log.warning("closed MLflow run %s (child of %s, still RUNNING) as %s: %s", run_id, parent_run_id, status,
                    reason)
    return stale
