"""Image input for every batch command (`digits predict`, `read`, `score`, `finetune`): which files
are images, and each file's bytes or MNIST form with the reason it cannot be read."""

import os
from pathlib import Path

from pipeline.core import normalize

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PARALLEL_FROM = 200  # from this many images on, decode them in worker processes (one per core)


def image_paths(arguments):
    """Files as given; folders expanded to the images inside them, sorted."""
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def read_bytes(path, name=None):
    """(the file's bytes, None), or (None, why it cannot be read). Messages call the file `name`
    (default: the path as given)."""
    try:
        return Path(path).read_bytes(), None
    except OSError as e:
        return None, f"{name or path}: {e.strerror or e}"


def decode_raw(data, name):
    """(the image as it was drawn or scanned, None) from encoded bytes, or (None, why not)."""
    try:
        return normalize.decode(data, name), None
    except normalize.ImageError as e:
        return None, str(e) if name in str(e) else f"{name}: {e}"


def decode_image(data, name):
    """(image in MNIST form, None) from an encoded image, or (None, why it cannot be read)."""
    try:
        return normalize.to_mnist(normalize.decode(data, name)), None
    except normalize.ImageError as e:  # its message names the file
        return None, str(e)


def read_image(path, name=None):
    """(path, image in MNIST form, None), or (path, None, why it cannot be read)."""
    data, error = read_bytes(path, name)
    if error:
        return path, None, error
    return (path, *decode_image(data, name or str(path)))


def read_images(paths):
    """read_image over all paths, in order, and the process pool doing it (None for a few paths).
    The pool starts at once: it decodes while the main process loads the model."""
    if len(paths) < PARALLEL_FROM or (os.cpu_count() or 1) < 2:
        return map(read_image, paths), None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the workers need NumPy and PIL, not a copy of this process's model threads.
    pool = ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn"))
    return pool.map(read_image, paths, chunksize=64), pool


def batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
