"""The exit step: delete the run's training jobs (TrainJobs, PyTorchJobs) and close its MLflow parent run,
however the run ended."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def cleanup(kfp_run_id: str, backend: str, namespace: str, experiment: str, status: dsl.PipelineTaskFinalStatus):
    """Delete every training job (TrainJob, PyTorchJob) labelled with this pipeline run (terminating a KFP
    run does not), then
    mark the run's MLflow parent run FINISHED or FAILED (its stale child runs KILLED, once the jobs are gone)."""
    from components.steps import cleanup_step, close_pipeline_run

    deleted = False
    try:
        cleanup_step(kfp_run_id, backend, namespace)
        deleted = True
    finally:
        close_pipeline_run(kfp_run_id, experiment, status.state, status.error_message, close_stale=deleted)
