"""Loading image files into (H, W, 3) uint8 RGB arrays."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000


def load_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Load an image file as an (H, W, 3) uint8 RGB array.

    EXIF orientation is applied; grayscale, palette, RGBA, LA, CMYK and 16-bit
    images are converted to RGB (alpha is dropped). The pixel count is checked
    from the header before decoding: width * height > max_pixels raises.
    Any failure raises ImageLoadError("<path>: <reason>").
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"{path}: no such file (expected an image file, e.g. .jpg or .png)")
    if not path.is_file():
        raise ImageLoadError(f"{path}: is a directory, not an image file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot stat file ({exc})") from exc
    if size == 0:
        raise ImageLoadError(f"{path}: file is empty (expected a JPEG or PNG image)")

    try:
        # PIL's own bomb check would fire at a different limit; ours is explicit.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width <= 0 or height <= 0:
                    raise ImageLoadError(f"{path}: image has no pixels ({width}x{height})")
                if width * height > max_pixels:
                    raise ImageLoadError(
                        f"{path}: image is {width}x{height} = {width * height} pixels, "
                        f"more than the limit of {max_pixels} (max_pixels)"
                    )
                img.load()  # decode now: truncated data raises here
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except ImageLoadError:
        raise
    except PermissionError as exc:
        raise ImageLoadError(f"{path}: permission denied ({exc.strerror})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{path}: not a recognised image format (expected JPEG or PNG)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{path}: image too large to decode safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"{path}: corrupt or truncated image data ({exc})") from exc

    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageLoadError(f"{path}: decoded to shape {array.shape}, expected (H, W, 3)")
    return np.ascontiguousarray(array)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; alpha is composited on black by dropping it."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bit.
        data = np.asarray(img, dtype=np.float64)
        peak = float(data.max()) if data.size else 0.0
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        gray = np.clip(data * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "F":
        data = np.asarray(img, dtype=np.float64)
        gray = np.clip(data, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")
