"""`digits finetune`: adapt a trained model to your own labelled images (transfer learning).

    digits finetune LABELS.csv | FOLDER [--model models/cnn.keras] [--out models/finetuned.keras]
                    [--holdout 0.2] [--train all|head] [--epochs 10] [--champion]

The images come as a CSV (columns file, label and, optionally, group; files relative to the CSV)
or as a folder with one sub-folder per digit (0/ ... 9/). Each is read as an upload is
(normalize.to_mnist). A share is held out first, whole groups at a time when the CSV names them
(one writer, one font, one scanner), so that it measures images unlike the ones trained on. Then:
  1. the model (a .keras file or an MLflow URI, with its calibration) is fine-tuned on the rest,
     mixed with as many MNIST training digits so that it keeps reading handwriting, with small
     random rotations, shifts and zooms; every layer learns, or only the dense head (--train head);
  2. it is calibrated again: one temperature, the "not sure" threshold that holds on the held-out
     share and on MNIST's validation split alike, and a "not a digit" gate that knows these images;
  3. OUT.keras, .calibration.json, .gate.pkl and .onnx are written (all or none), so that
     `digits predict --model OUT.keras` serves it;
  4. an MLflow run records it: the parent model as lineage, accuracy before and after on the
     held-out share and on MNIST's test split; the model is registered as a new version of the
     parent's registered model. The champion alias moves only with --champion.
Bad input (an unreadable image, a label outside 0-9, too few images of a digit, a model without a
calibration) stops it before training, naming the file; nothing is written or registered then.
Needs MNIST's splits in data/processed (`dvc pull`, or `./dev repro preprocess`).
"""

import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline.core import params as params_module
from pipeline.core.files import DataError, load_arrays, require, sha256
from pipeline.core.layout import DIGITS, NUM_CLASSES, PROCESSED_DIR

MIN_PER_DIGIT = 10  # images of each digit, so that both shares hold some
REPEATS = 4  # each epoch sees every fine-tuning image this often (augmented), and as many MNIST digits
BATCH_SIZE = 64
LABEL_SMOOTHING = 0.1  # as the models were trained; calibration undoes its under-confidence


class FinetuneError(ValueError):
    pass


def labelled_files(source):
    """[(path, label, group or None)] from a CSV or a folder of digit sub-folders."""
    from pipeline.serving.cli import IMAGE_SUFFIXES

    source = Path(source)
    if source.is_dir():
        wrong = sorted(p.name for p in source.iterdir() if p.is_dir() and p.name not in map(str, DIGITS))
        if wrong:
            raise FinetuneError(f"{source}/{wrong[0]}: expected one sub-folder per digit, named 0 to 9")
        return [
            (path, int(folder.name), None)
            for folder in sorted(p for p in source.iterdir() if p.is_dir())
            for path in sorted(folder.iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
    if not source.is_file():
        raise FinetuneError(f"{source}: no such CSV file or folder")
    with source.open(newline="") as f:
        reader = csv.DictReader(f)
        if not {"file", "label"} <= set(reader.fieldnames or ()):
            raise FinetuneError(f"{source}: expected a header with the columns file and label (and optionally group)")
        rows = []
        for line, row in enumerate(reader, start=2):
            label = (row["label"] or "").strip()
            if label not in map(str, DIGITS):
                raise FinetuneError(f"{source} line {line}: label {label!r} of {row['file']} is not a digit 0-9")
            rows.append((source.parent / row["file"], int(label), row.get("group") or None))
    return rows


def read_labelled(source):
    """Images in MNIST form (n, 28, 28, 1), labels (n,) and groups (n,) of a labelled set, checked."""
    from pipeline.serving.cli import read_image

    files = labelled_files(source)
    images, errors = [], []
    for path, _, _ in files:
        _, image, error = read_image(path)
        errors.append(error) if error else images.append(image)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise FinetuneError(f"cannot read {errors[0]}{more}")
    labels = np.array([label for _, label, _ in files])
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if counts.min() < MIN_PER_DIGIT:
        digit = int(counts.argmin())
        raise FinetuneError(f"{source}: {counts[digit]} images of the digit {digit}: at least {MIN_PER_DIGIT} of each")
    groups = np.array([group or f"{path}" for path, _, group in files])
    return np.stack(images)[..., None], labels, groups


def held_out(labels, groups, share, seed):
    """(fine-tuning indices, held-out indices): whole groups, or a stratified share."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedShuffleSplit

    grouped = len(set(groups)) < len(groups)
    splitter = (GroupShuffleSplit if grouped else StratifiedShuffleSplit)(1, test_size=share, random_state=seed)
    train, hold = next(splitter.split(np.zeros(len(labels)), labels, groups if grouped else None))
    for name, part in (("fine-tuning", train), ("held-out", hold)):
        missing = sorted(set(DIGITS) - set(labels[part].tolist()))
        if missing:
            raise FinetuneError(f"the {name} share has no image of the digit {missing[0]}: add images or groups")
    return train, hold


def parent_model(source):
    """The model to start from (a Predictor on TensorFlow: its .keras file and calibration), and
    what identifies it, for lineage."""
    from pipeline.serving.predictor import Predictor

    try:
        parent = Predictor(source, runtime="tf")
    except (FileNotFoundError, ValueError) as e:
        raise FinetuneError(str(e)) from None
    if parent.calibration is None:
        raise FinetuneError(f"{source}: the model has no calibration; run `dvc repro calibrate` (or `dvc pull`) first")
    lineage = {"parent_model": parent.source, "parent_sha256": sha256(parent.keras_path)}
    if parent.registered:
        lineage.update(parent_registered_model=parent.registered["name"], parent_version=parent.registered["version"])
    else:
        run_file = parent.keras_path.with_name(f"{parent.keras_path.stem}.run.json")
        if run_file.exists():  # a pipeline model: its training run and registered version
            known = json.loads(run_file.read_text())
            lineage.update(parent_run_id=known["run_id"], parent_registered_model=known["registered_model"])
            if known.get("model_version"):
                lineage["parent_version"] = known["model_version"]
    return parent, {key: str(value) for key, value in lineage.items()}


def fine_tune(model, x, y, mnist_x, mnist_y, args):
    import keras
    import tensorflow as tf

    from pipeline.core.augmentation import RandomAffine

    if args.train == "head":  # the layers after the convolutions' features are flattened
        flatten = max(i for i, layer in enumerate(model.layers) if isinstance(layer, keras.layers.Flatten))
        for layer in model.layers[: flatten + 1]:
            layer.trainable = False
    rng = np.random.default_rng(args.seed)
    mnist = rng.choice(len(mnist_x), min(len(mnist_x), REPEATS * len(x)), replace=False)
    images = np.concatenate([np.repeat(x, REPEATS, axis=0), mnist_x[mnist]])
    targets = np.concatenate([np.repeat(keras.utils.to_categorical(y, NUM_CLASSES), REPEATS, axis=0), mnist_y[mnist]])
    augment = RandomAffine(rotation_degrees=10, shift_fraction=0.1, zoom_fraction=0.1, seed=args.seed)
    steps = int(np.ceil(len(images) / BATCH_SIZE))
    batches = (
        tf.data.Dataset.from_tensor_slices((images, targets))
        .shuffle(len(images), seed=args.seed)
        .batch(BATCH_SIZE)
        .map(lambda a, b: (augment(a, training=True), b))
        .prefetch(tf.data.AUTOTUNE)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(args.learning_rate, args.epochs * steps)
        ),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=LABEL_SMOOTHING),
        metrics=["accuracy"],
    )
    model.fit(batches, epochs=args.epochs, shuffle=False, verbose=2)  # the dataset shuffles


def recalibrate(model, held, mnist, accepted_accuracy):
    """Temperature and "not sure" threshold: both fitted so the promise holds on the held-out share
    and on MNIST's validation digits alike (the threshold is the higher of the two they ask for)."""
    from pipeline.core import confidence

    raw = {name: model.predict(x, batch_size=1000, verbose=0) for name, (x, _) in (("held", held), ("mnist", mnist))}
    temperature = confidence.fit_temperature(
        np.concatenate([raw["held"], raw["mnist"]]), np.concatenate([held[1], mnist[1]])
    )
    threshold = max(
        confidence.not_sure_threshold(confidence.with_temperature(raw[name], temperature), labels, accepted_accuracy)
        for name, (_, labels) in (("held", held), ("mnist", mnist))
    )
    return temperature, threshold


def accuracy(model, x, labels):
    return float(np.mean(model.predict(x, batch_size=1000, verbose=0).argmax(1) == labels))


def finetune(args):
    import joblib
    import keras
    import mlflow

    from pipeline.core import confidence, gate, graph, registry, tracking
    from pipeline.core.files import write_json

    params = params_module.load(args.params)
    x, labels, groups = read_labelled(args.images)
    train, hold = held_out(labels, groups, args.holdout, args.seed)
    require(PROCESSED_DIR)
    data = load_arrays(PROCESSED_DIR, ["x_train", "y_train", "x_val", "y_val", "x_test", "y_test"])
    parent, lineage = parent_model(args.model)
    model = keras.models.load_model(parent.keras_path, compile=False)
    kind = model.name
    print(
        f"finetune: {len(x)} images read; fine-tuning on {len(train)}, holding out {len(hold)}"
        f"{f' ({len(set(groups[hold]))} groups)' if len(set(groups)) < len(groups) else ''}; from {args.model}",
        flush=True,
    )

    mnist_val, mnist_test = (data["x_val"], data["y_val"].argmax(1)), (data["x_test"], data["y_test"].argmax(1))
    before = {"held_out": accuracy(model, x[hold], labels[hold]), "mnist_test": accuracy(model, *mnist_test)}
    keras.utils.set_random_seed(args.seed)
    fine_tune(model, x[train], labels[train], data["x_train"], data["y_train"], args)
    after = {"held_out": accuracy(model, x[hold], labels[hold]), "mnist_test": accuracy(model, *mnist_test)}
    after["mnist_val"] = accuracy(model, *mnist_val)

    print('finetune: calibrating again, and fitting the "not a digit" gate', flush=True)
    temperature, threshold = recalibrate(model, (x[hold], labels[hold]), mnist_val, params.calibrate.accepted_accuracy)
    fitted_gate, _ = gate.fit(
        model,
        data["x_train"],
        np.concatenate([data["x_val"], x[hold]]),
        args.seed,
        params.calibrate.nondigits_per_kind,
        params.calibrate.digit_flag_rate,
        own_digits=x[train],
    )
    held_probabilities = confidence.with_temperature(model.predict(x[hold], verbose=0), temperature)
    sure = confidence.selective_scores(held_probabilities, labels[hold], threshold)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".finetune-") as folder:
        # All four files are made and checked in a scratch folder, then moved beside each other.
        staged = {
            suffix: Path(folder) / f"{out.stem}{suffix}"
            for suffix in (".keras", ".calibration.json", ".gate.pkl", ".onnx")
        }
        model.save(staged[".keras"])
        joblib.dump(fitted_gate, staged[".gate.pkl"])
        calibration = {
            "temperature": temperature,
            "not_sure_below": threshold,
            "accepted_accuracy": params.calibrate.accepted_accuracy,
            "not_a_digit_above": fitted_gate.threshold,
            "model_sha256": sha256(staged[".keras"]),
            "gate_sha256": sha256(staged[".gate.pkl"]),
        }
        write_json(staged[".calibration.json"], calibration)
        graph.export(staged[".keras"], staged[".calibration.json"], staged[".gate.pkl"], staged[".onnx"], x[hold])

        tracking.use_experiment(params.mlflow.experiment)
        with tracking.run(run_name=f"{kind}-finetune", tags={**tracking.run_tags(kind, "finetune"), **lineage}):
            mlflow.log_params(
                {
                    "parent_model": args.model,
                    "train": args.train,
                    "epochs": args.epochs,
                    "learning_rate": args.learning_rate,
                    "holdout": args.holdout,
                    "seed": args.seed,
                    "finetune_images": len(train),
                    "held_out_images": len(hold),
                    "temperature": round(temperature, 4),
                    "not_sure_below": threshold,
                }
            )
            mlflow.log_input(
                mlflow.data.from_numpy(x[train], targets=labels[train], name="finetune"), context="training"
            )
            mlflow.log_input(
                mlflow.data.from_numpy(x[hold], targets=labels[hold], name="held-out"), context="validation"
            )
            mlflow.log_metrics(
                {
                    **{f"before_{k}_accuracy": v for k, v in before.items()},
                    **{f"after_{k}_accuracy": v for k, v in after.items()},
                    "held_out_coverage": sure["coverage"],
                    "held_out_sure_accuracy": sure["accepted_accuracy"],
                }
            )
            info = tracking.log_keras_model(model, x[:1], name="model")
            mlflow.log_dict(calibration, "calibration.json")
            mlflow.log_artifact(str(staged[".gate.pkl"]), "gate")
            mlflow.log_artifact(str(staged[".onnx"]), "onnx")
            name = lineage.get("parent_registered_model", registry.registered_name(kind))
            version = mlflow.register_model(info.model_uri, name, tags={**lineage, "finetuned": "true"})
            if args.champion:
                registry.set_champion(version)
        for suffix, path in staged.items():
            path.replace(out.with_name(out.stem + suffix))  # one file system: each appears whole

    champion = (
        "now the champion"
        if args.champion
        else f"the champion did not move (`digits promote {name} {version.version}`)"
    )
    print(
        f"finetune: held-out accuracy {before['held_out']:.2%} -> {after['held_out']:.2%} "
        f"({sure['coverage']:.1%} of it sure, {sure['accepted_accuracy']:.2%} of those right); MNIST test "
        f"{before['mnist_test']:.2%} -> {after['mnist_test']:.2%}. Wrote {out} (+ .calibration.json, .gate.pkl, "
        f".onnx); registered {name} v{version.version}, {champion}",
        flush=True,
    )
    return {
        "finetune_images": len(train),
        "held_out_images": len(hold),
        "before": before,
        "after": after,
        "held_out_sure": sure,
        "registered": f"{name} v{version.version}",
    }


def main(args):
    try:
        finetune(args)
    except (FinetuneError, DataError, params_module.ParamsError) as e:
        print(f"digits finetune: {e}", file=sys.stderr)
        return 2
    return 0


def share(text):
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(text)
    return value


def positive(text):
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def add_arguments(parser):
    parser.add_argument("images", help="a CSV (file,label[,group]) or a folder with sub-folders 0 to 9")
    parser.add_argument(
        "--model",
        default="models/cnn.keras",
        help="the model to start from: a .keras file or an MLflow URI (models:/digits-cnn@champion)",
    )
    parser.add_argument(
        "--out",
        default="models/finetuned.keras",
        help="where the fine-tuned model goes (default models/finetuned.keras)",
    )
    parser.add_argument(
        "--holdout", type=float, default=0.2, help="share held out to measure and calibrate on (default 0.2)"
    )
    parser.add_argument("--train", choices=["all", "head"], default="all", help="which layers learn (default all)")
    parser.add_argument("--epochs", type=positive, default=10)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--champion", action="store_true", help="make the new version the champion")
    parser.add_argument("--params", default="params.yaml")
