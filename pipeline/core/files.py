"""Atomic output files: a failed stage leaves nothing half-written for DVC to cache."""

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


class DataError(ValueError):
    """A stage's input is missing or is not what the stage expects; the message says which and why."""


def require(*paths):
    """DataError naming every one of `paths` that does not exist (an earlier stage writes them)."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise DataError(
            f"{', '.join(missing)} not found: an earlier stage writes {'it' if len(missing) == 1 else 'them'} "
            f"(run `dvc repro`)"
        )


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the user's usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sha256(path):
    """The file's SHA-256, hex: what ties a calibration or an ONNX export to its .keras file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_arrays(folder, arrays):
    """Save each array as folder/NAME.npy (.npy bytes are deterministic, unlike .npz zip stamps)."""
    for name, array in arrays.items():
        with atomic_path(Path(folder) / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, array)


def load_arrays(folder, names):
    folder = Path(folder)
    missing = [n for n in names if not (folder / f"{n}.npy").exists()]
    if missing:
        raise DataError(f"{folder}/ lacks {', '.join(m + '.npy' for m in missing)}: run `dvc repro` to produce it")
    return {n: np.load(folder / f"{n}.npy") for n in names}
