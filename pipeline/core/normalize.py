"""Bring an image from the outside world to MNIST's form, the way MNIST itself was made.

Real images are larger than 28x28, often dark ink on light paper, off-centre and with margins.
MNIST's recipe: white ink on black, the digit fitted into a 20x20 box keeping its aspect ratio,
then placed so its centre of mass sits at the centre of a 28x28 field; values in [0, 1].
Used by the CLI, the REST API and the web page alike.
"""

import functools
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_BYTES = 10 * 1024 * 1024  # an upload larger than this is refused before decoding
MAX_PIXELS = 40_000_000  # refuse decompression bombs: a small file that decodes huge
INK_THRESHOLD = 0.1  # after scaling to 0-1, pixels above this are ink: for cropping, and for every rule that counts ink


class ImageError(ValueError):
    """The input cannot be read as a digit image; the message says why."""


class ImageTooLarge(ImageError):
    """The input is over a size limit (bytes or pixels)."""


def decode(data: bytes, name="image"):
    """Bytes of a PNG/JPEG/BMP/GIF/WebP/... file -> PIL image, with size limits checked first."""
    if not data:
        raise ImageError(f"{name}: empty file")
    if len(data) > MAX_BYTES:
        raise ImageTooLarge(f"{name}: {len(data):,} bytes is over the {MAX_BYTES:,}-byte limit")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own limit, hit while opening very large images
        raise ImageTooLarge(f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image PIL can read (PNG, JPEG, BMP, GIF, WebP, TIFF ...)") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"{name}: {width}x{height} pixels is over the {MAX_PIXELS:,}-pixel limit")
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name}: {e}") from None
    except OSError as e:
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from None
    return image


def to_gray(image):
    """PIL image or array -> float grey levels in [0, 1]; transparency becomes white paper."""
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32)
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            array = array[..., :3].mean(axis=-1)
        elif array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2:
            raise ImageError(f"array of shape {image.shape}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
        return array / 255.0 if array.max() > 1.0 else array
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32) / np.float32(255.0)


def to_ink(gray, background=None):
    """Grey levels -> ink in [0, 1] on a zero background, whichever the polarity of the original.
    The background is the border's median level unless given (a piece already cut from ink)."""
    if background is None:
        background = float(np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])))
    ink = 1.0 - gray if background > 0.5 else gray  # light paper: dark ink becomes bright
    background = 1.0 - background if background > 0.5 else background
    span = ink.max() - background
    if span < 0.05:
        raise ImageError("no digit found: the image is blank (no ink stands out from the background)")
    return np.clip((ink - background) / span, 0.0, 1.0)


def centre_by_mass(digit, size=28):
    """Paste `digit` into a size x size field so its centre of mass lands on the centre."""
    field = np.zeros((size, size))
    h, w = digit.shape
    top, left = (size - h) // 2, (size - w) // 2
    field[top : top + h, left : left + w] = digit
    rows, cols = _indices(size)
    total = field.sum()
    shift_r = int(round((size - 1) / 2 - (rows * field).sum() / total))
    shift_c = int(round((size - 1) / 2 - (cols * field).sum() / total))
    # Clamp so the shift never pushes ink off the field; the ink then moves as a block (np.roll
    # would wrap only empty rows and columns, and costs more).
    ink_r, ink_c = np.flatnonzero(field.any(axis=1)), np.flatnonzero(field.any(axis=0))
    shift_r = min(max(shift_r, -int(ink_r[0])), size - 1 - int(ink_r[-1]))
    shift_c = min(max(shift_c, -int(ink_c[0])), size - 1 - int(ink_c[-1]))
    centred = np.zeros_like(field)
    centred[max(shift_r, 0) : size + min(shift_r, 0), max(shift_c, 0) : size + min(shift_c, 0)] = field[
        max(-shift_r, 0) : size - max(shift_r, 0), max(-shift_c, 0) : size - max(shift_c, 0)
    ]
    return centred


@functools.cache
def _indices(size):
    """Each pixel's row and column, for centre_by_mass (made once: it runs for every piece a reader tries)."""
    return np.indices((size, size))


def to_mnist(image):
    """A PIL image or NumPy array of any size, colour or grey, either polarity -> (28, 28) float32."""
    return ink_to_mnist(to_ink(to_gray(image)))


def ink_to_mnist(ink):
    """Ink in [0, 1] on a zero background (to_ink's) -> (28, 28) float32: fitted into a 20x20 box
    and centred by its mass."""
    rows, cols = np.nonzero(ink > INK_THRESHOLD)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = crop.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    fitted = Image.fromarray((crop * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    digit = np.asarray(fitted, dtype=np.float64) / 255.0
    return centre_by_mass(digit).clip(0.0, 1.0).astype(np.float32)


def from_array(pixels):
    """A 28x28 array already in MNIST's form (0-1 or 0-255 values), checked, as float32."""
    array = np.asarray(pixels, dtype=np.float64)
    if array.shape != (28, 28):
        raise ImageError(f"pixels: got shape {array.shape}, expected (28, 28)")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise ImageError("pixels: values must be finite, in [0, 1] or in [0, 255]")
    return (array / 255.0 if array.max() > 1.0 else array).astype(np.float32)
