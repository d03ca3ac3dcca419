import json

import numpy as np

from pipeline import preprocess
from pipeline.core.files import save_arrays
from tests.helpers import tiny_images


def test_scale_and_one_hot():
    x, y = tiny_images(20)
    scaled = preprocess.scale(x)
    assert scaled.dtype == np.float32 and scaled.shape == (20, 28, 28, 1)
    assert scaled.min() >= 0.0 and scaled.max() <= 1.0
    assert np.allclose(scaled[..., 0] * 255, x)
    labels = preprocess.one_hot(y)
    assert labels.shape == (20, 10) and np.array_equal(labels.argmax(1), y)


def test_split_is_stratified_and_seeded():
    rng = np.random.default_rng(0)
    y = rng.choice(10, size=2000, p=np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum()).astype(np.uint8)
    x = np.arange(len(y))
    (x_tr, y_tr), (x_va, y_va) = preprocess.split(x, y, 400, seed=7)
    assert len(y_va) == 400 and len(y_tr) == 1600
    assert set(x_tr).isdisjoint(x_va)
    whole, held_out = np.bincount(y, minlength=10) / len(y), np.bincount(y_va, minlength=10) / len(y_va)
    assert np.abs(whole - held_out).max() < 0.01
    (_, _), (x_va2, _) = preprocess.split(x, y, 400, seed=7)
    (_, _), (x_va3, _) = preprocess.split(x, y, 400, seed=8)
    assert np.array_equal(x_va, x_va2) and not np.array_equal(x_va, x_va3)


def test_stage_writes_processed_arrays_and_stats(project):
    project(preprocess__val_size=100, preprocess__max_train_images=500, preprocess__max_test_images=50)
    x_train, y_train = tiny_images(1000, seed=1)
    x_test, y_test = tiny_images(100, seed=2)
    save_arrays("data/raw", {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test})

    preprocess.main()

    out = {n: np.load(f"data/processed/{n}.npy") for n in ["x_train", "y_train", "x_val", "y_val", "x_test", "y_test"]}
    assert out["x_train"].shape == (400, 28, 28, 1) and out["x_val"].shape == (100, 28, 28, 1)
    assert out["x_test"].shape == (50, 28, 28, 1) and out["y_test"].shape == (50, 10)
    stats = json.loads(open("reports/data_stats.json").read())
    assert stats["val"]["images"] == 100
    # Stratified: 40 of each class in training, give or take the rounding of one image.
    assert all(abs(n - 40) <= 1 for n in stats["train"]["class_counts"].values())
    assert sum(stats["train"]["class_counts"].values()) == 400
    assert abs(stats["test"]["pixel_mean"] - float(out["x_test"].mean())) < 1e-5
