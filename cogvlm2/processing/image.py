"""Image loading and the official CLIP preprocessing (bicubic resize to a square, /255, mean/std)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# OpenAI CLIP normalisation (open_clip OPENAI_DATASET_MEAN / OPENAI_DATASET_STD), images and video frames
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard for untrusted input


# Formats Image.open may pick (its own sniffing decides, whatever the name or MIME type says). Not EPS,
# which Pillow hands to Ghostscript, nor the many rarely used decoders nobody sends a chat model.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageError(ValueError):
    """An image could not be read; the message says why."""


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open a path / bytes / PIL image as RGB, like the official demo: `.convert('RGB')` (alpha dropped).

    Only IMAGE_FORMATS are opened, at most MAX_IMAGE_PIXELS pixels; any failure to decode (Pillow's
    decoders raise OSError, ValueError, IndexError, EOFError, struct.error, ... on malformed files)
    is an ImageError."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    except OSError as e:
        raise ImageError(f"cannot open image {source!r}: {e.strerror or e}") from None
    with fp:
        try:
            with Image.open(fp, formats=IMAGE_FORMATS) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"image too large: {img.width}x{img.height} pixels (limit {MAX_IMAGE_PIXELS})")
                img.seek(0)  # first frame of animated formats
                return img.convert("RGB")
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(f"cannot decode image: not a {', '.join(IMAGE_FORMATS)} file") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"image too large: {e}") from None
        except Exception as e:  # noqa: BLE001 - a malformed file, whatever Pillow's decoder raised
            reason = str(e) or type(e).__name__
            raise ImageError(f"cannot decode image: {reason}") from None


def transform_image(image: Image.Image, image_size: int) -> tuple[torch.Tensor, str]:
    """RGB PIL image -> (pixel values [3, S, S] float32, content hash of the resized image).

    The hash identifies the image for prefix caching (every image has the same placeholder ids).
    """
    resized = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    arr = np.asarray(resized, dtype=np.uint8)
    digest = hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()
    x = torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std, digest
