"""The encode step: images -> VAE latents (or pixels) in object storage (`maskdit encode`)."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def encode(images: str, store_uri: str, resolution: int, vae: str, pixel_space: bool, grayscale: bool, gpus: int,
           dataset_id: str, dataset: Output[Dataset]):
    """Encode class folders of images into latent shards (`maskdit encode`).

    images: folder or s3:// prefix of class folders, or "mnist" for the bundled MNIST-5k digits.
    The shards go to <store_uri>/datasets/<name>-<identity[:12]>; the Dataset artifact points there.
    gpus: the GPUs this pod was given (0: encode on the CPU).
    dataset_id: the fingerprint step's identity of the images (the cache key; checked again here).
    """
    from components.steps import encode_step

    encode_step(images, store_uri, resolution, vae, pixel_space, grayscale, "cuda" if gpus else "cpu", dataset,
                dataset_id)
