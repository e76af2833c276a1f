"""Image decoding for encoding: bad-input handling and ADM's center crop, to arrays in [-1, 1].

What real folders hold, and what happens to it:
- RGB / palette / grayscale / CMYK / YCbCr / 1-bit: converted to RGB (or to L with `grayscale`);
- transparency (RGBA, LA, palette with a transparent colour): composited onto white;
- 16-bit and 32-bit integer or float grayscale: rescaled to 8 bit (not clipped);
- truncated or undecodable files, images smaller than `min_side(resolution)`, images of more than
  `MAX_PIXELS` pixels: `BadImage` with the reason (the encoder skips them and lists them in the manifest);
- long strips: the long side is cropped to `MAX_ASPECT` x the short side, centred, before any
  resize (the crop keeps only the centre square anyway), so a 31 KB PNG of 1,000,000 x 32 px
  costs 128 x 32 px of resizing instead of 8,000,000 x 256 (6 GB).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
MAX_PIXELS = 8192 * 8192  # decoded pixels an image may have (67 Mpx, 200 MB as RGB); larger ones are skipped
MAX_ASPECT = 4  # the long side is cropped to this many short sides before resizing (photos keep ADM's exact crop)


class BadImage(ValueError):
    """An input file that cannot become a training image; `str(error)` is the reason."""


def min_side(resolution: int) -> int:
    """Images whose short side is below this are skipped as tiny (upscaled > 8x they are mostly blur)."""
    return max(4, resolution // 8)


def trim_long_side(image: Image.Image) -> Image.Image:
    """The centre of `image` with its long side cut to MAX_ASPECT x the short side (a no-op for photos).

    Resizing then costs at most MAX_ASPECT x image_size^2 pixels whatever the geometry.
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long <= MAX_ASPECT * short:
        return image
    keep = MAX_ASPECT * short
    start = (long - keep) // 2
    return image.crop((start, 0, start + keep, height) if width > height else (0, start, width, start + keep))


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's crop (guided-diffusion `center_crop_arr`): BOX-halve while >= 2x, BICUBIC resize, crop.

    Exactly ADM's for aspect ratios up to MAX_ASPECT; longer strips are trimmed first (`trim_long_side`).
    """
    image = trim_long_side(image)
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """High-bit-depth single-channel modes ("I;16*", "I", "F") to "L", rescaling the value range."""
    arr = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        top = 1.0 if arr.size and arr.max() <= 1.0 else 255.0
    elif image.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        top = 65535.0
    else:
        top = 255.0
    return Image.fromarray(np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8), mode="L")


def normalize_mode(image: Image.Image, grayscale: bool = False) -> Image.Image:
    """Any PIL mode to "RGB" (or "L" when `grayscale`)."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit_gray(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    target = "L" if grayscale else "RGB"
    return image if image.mode == target else image.convert(target)


def load_image(data: bytes, resolution: int, grayscale: bool = False) -> np.ndarray:
    """Encoded image bytes -> (resolution, resolution, C) uint8, C = 1 or 3; `BadImage` if unusable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF / palette chatter of odd files
            image = Image.open(io.BytesIO(data))  # reads the header only
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise BadImage(f"too many pixels: {width}x{height} px is above the {MAX_PIXELS:,} px limit "
                               "(images.MAX_PIXELS); downscale it")
            image.load()
    except UnidentifiedImageError:
        raise BadImage("not a decodable image") from None
    except Image.DecompressionBombError as error:
        raise BadImage(f"too large to decode safely ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"truncated or corrupt ({error})") from None
    if min(image.size) < min_side(resolution):
        raise BadImage(f"tiny: {image.size[0]}x{image.size[1]} px, below {min_side(resolution)} px "
                       f"for a {resolution} px crop")
    arr = center_crop_arr(normalize_mode(trim_long_side(image), grayscale), resolution)
    return arr[:, :, None] if arr.ndim == 2 else arr


def to_tensor(arrays: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [-1, 1]."""
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))
    return batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0
