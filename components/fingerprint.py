"""The fingerprint step: the identity of the dataset encode would make, from a listing (no image is read)."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fingerprint(images: str, resolution: int, vae: str, pixel_space: bool, grayscale: bool) -> str:
    """The sha256 of what the encode step would encode: the listing of `images` (sizes, ETags or mtimes),
    the resolution, the VAE and the options. Uncached; the encode step takes it as an input, so KFP's
    cache of encode keys on the data, not on the URI string."""
    from components.steps import fingerprint_step

    return fingerprint_step(images, resolution, vae, pixel_space, grayscale)
