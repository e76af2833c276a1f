"""The encode step: images -> VAE latents (or pixels) in object storage (`maskdit encode`), in its pod or as a job."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def encode(images: str, store_uri: str, resolution: int, vae: str, pixel_space: bool, grayscale: bool, gpus: int,
           dataset_id: str, as_job: bool, cluster: dict, timeout_hours: float, dataset: Output[Dataset]):
    """Encode class folders of images into latent shards (`maskdit encode`).

    images: folder or s3:// prefix of class folders, or "mnist" for the bundled MNIST-5k digits.
    The shards go to <store_uri>/datasets/<name>-<identity[:12]>; the Dataset artifact points there.
    gpus: the GPUs this pod was given (0: encode on the CPU).
    dataset_id: the fingerprint step's identity of the images (the cache key; checked again here).
    as_job: run `maskdit encode` as a job on the cluster's GPUs (`cluster`: the settings step's output; local
    backend: torchrun with local_nproc processes), deleted after `timeout_hours`; false: in this pod.
    """
    from components.steps import encode_step, job_plan

    encode_step(images, store_uri, resolution, vae, pixel_space, grayscale, "cuda" if gpus else "cpu", dataset,
                dataset_id, job_plan(as_job, cluster, timeout_hours))
