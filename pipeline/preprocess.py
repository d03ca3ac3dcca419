"""Stage preprocess: data/raw -> data/processed, ready for Keras.

Pixels scaled to [0, 1] float32 and shaped (N, 28, 28, 1); labels one-hot; a stratified, seeded
validation split held out of the 60,000 training images (the test set is never used to train or
to pick a model). Also writes reports/data_stats.json.
"""

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.core import params as params_module
from pipeline.core.files import load_arrays, save_arrays, write_json
from pipeline.core.layout import DATA_STATS_FILE, NUM_CLASSES, PROCESSED_DIR, RAW_DIR


def scale(images):
    return (images.astype(np.float32) / 255.0)[..., np.newaxis]


def one_hot(labels):
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels]


def stratified_subset(x, y, size, seed):
    """`size` images with the class mix of the whole, or everything when size is None."""
    if size is None or size >= len(y):
        return x, y
    x_keep, _, y_keep, _ = train_test_split(x, y, train_size=size, stratify=y, random_state=seed)
    return x_keep, y_keep


def split(x, y, val_size, seed):
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=val_size, stratify=y, random_state=seed)
    return (x_train, y_train), (x_val, y_val)


def stats(splits):
    return {
        name: {
            "images": int(len(y)),
            "class_counts": {str(c): int(n) for c, n in enumerate(np.bincount(y, minlength=NUM_CLASSES))},
            "pixel_mean": round(float(x.mean()), 6),
            "pixel_std": round(float(x.std()), 6),
        }
        for name, (x, y) in splits.items()
    }


def preprocess(params):
    raw = load_arrays(RAW_DIR, ["x_train", "y_train", "x_test", "y_test"])

    x, y = stratified_subset(raw["x_train"], raw["y_train"], params.preprocess.max_train_images, params.seed)
    x_test, y_test = stratified_subset(raw["x_test"], raw["y_test"], params.preprocess.max_test_images, params.seed)
    (x_train, y_train), (x_val, y_val) = split(x, y, params.preprocess.val_size, params.seed)
    splits = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}

    arrays = {}
    for name, (images, labels) in splits.items():
        arrays[f"x_{name}"] = scale(images)
        arrays[f"y_{name}"] = one_hot(labels)
    save_arrays(PROCESSED_DIR, arrays)
    write_json(DATA_STATS_FILE, stats({name: (arrays[f"x_{name}"], labels) for name, (_, labels) in splits.items()}))
    sizes = ", ".join(f"{name} {len(labels)}" for name, (_, labels) in splits.items())
    print(f"preprocess: wrote {PROCESSED_DIR}/ ({sizes}) and {DATA_STATS_FILE}")


def main():
    params_module.run_stage("preprocess", preprocess)


if __name__ == "__main__":
    main()
