"""Load params.yaml into typed objects. Every value is checked before any work starts, and an
error names the key, the value found and what is allowed."""

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import yaml

from pipeline.core.files import DataError

SOURCES = ("local", "mirrors", "pypi")
ARCHS = ("plain", "resnet")  # cnn.arch


class ParamsError(ValueError):
    pass


@dataclass(frozen=True)
class FetchParams:
    sources: tuple
    local_dir: str | None
    mirrors: tuple
    timeout_seconds: float


@dataclass(frozen=True)
class PreprocessParams:
    val_size: int
    max_train_images: int | None
    max_test_images: int | None


@dataclass(frozen=True)
class AugmentParams:
    rotation_degrees: float
    shift_fraction: float
    zoom_fraction: float
    shift_share: float  # of each batch, given one of `shifts` each, at the `shifts` section's strengths
    shifts: tuple  # the names drawn from (SHIFTS), uniformly
    printed_share: float  # of each batch, replaced by its digit printed in a training font


@dataclass(frozen=True)
class TrainingParams:
    """How a model is trained: the part of its params.yaml section that both models have."""

    dropout: float
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_epochs: int
    label_smoothing: float
    ema_momentum: float  # 0 = off; else the weights kept are an exponential moving average
    augment: AugmentParams

    def flat(self):
        """The section as params.yaml spells it, flattened with dots (e.g. for MLflow)."""
        section = {k: v for k, v in vars(self).items() if k != "augment"}
        section.update({f"augment.{k}": v for k, v in vars(self.augment).items()})
        section = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
        return {f"{self.name}.{k}": v for k, v in section.items()}


@dataclass(frozen=True)
class MLPParams(TrainingParams):
    hidden_units: tuple
    name: ClassVar[str] = "mlp"


@dataclass(frozen=True)
class CNNParams(TrainingParams):
    arch: str  # "plain" or "resnet" (ARCHS)
    filters: tuple  # one convolution block per entry
    convs_per_block: tuple
    dense_units: int
    name: ClassVar[str] = "cnn"


@dataclass(frozen=True)
class MLflowParams:
    experiment: str


@dataclass(frozen=True)
class CalibrateParams:
    accepted_accuracy: float  # how often answers above the "not sure" threshold must be right
    accepted_accuracy_under_shift: float  # the same on each corrupted copy of the validation images
    soft_share_of_clean: tuple  # candidates: the share of clean validation digits counted soft (blurred, low-res)
    smooth_below: tuple  # candidates: soft only if its steepest steps are below this (gate.steepest_steps)
    nondigits_per_kind: int  # generated non-digits of each kind the "not a digit" gate learns from
    digit_flag_rate: float  # the most validation digits the gate may flag
    bootstrap_resamples: int  # calibrations on resamples of the validation copies, to measure the coverage's spread


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    nondigits_per_kind: int  # generated non-digits of each kind the gate is measured on


@dataclass(frozen=True)
class ShiftParams:
    seed: int
    strengths: dict  # name -> (low, high), drawn per image; see pipeline/core/shifts/corruptions.py


@dataclass(frozen=True)
class ReadEvalParams:
    seed: int
    strings_per_kind: int  # 5-digit strings of each spacing kind
    strings_per_length: int  # strings with clear gaps of each length 1-10


@dataclass(frozen=True)
class ReadParams:
    """The line reader (train_reader): how it is trained and when a number it reads is sure."""

    seed: int
    training_lines: int  # lines written from training digits
    validation_lines: int  # lines written from validation digits: the epoch kept, the calibration
    validation_numbers_per_kind: int  # plain numbers from validation digits, as read_eval writes them:
    validation_numbers_per_length: int  # the calibration's second family (numbers.evaluation_sets)
    epochs: int
    batch_size: int
    learning_rate: float  # at the start, decaying to zero along a cosine
    accepted_accuracy: float  # of the plain numbers marked sure, the share read exactly
    accepted_accuracy_lines: float  # ... and of the lines with a scanner's variety


@dataclass(frozen=True)
class VisualizeParams:
    grid_images: int


@dataclass(frozen=True)
class Params:
    """params.yaml, one field per top-level key, each section its own dataclass."""

    epochs: int
    seed: int
    fetch: FetchParams
    preprocess: PreprocessParams
    mlflow: MLflowParams
    mlp: MLPParams
    cnn: CNNParams
    calibrate: CalibrateParams
    evaluate: EvaluateParams
    shifts: ShiftParams
    read: ReadParams
    read_eval: ReadEvalParams
    visualize: VisualizeParams

    def model(self, name):
        """The params.yaml section of model `name` ("mlp" or "cnn")."""
        return getattr(self, name)


class _Reader:
    """Reads dotted keys out of the YAML tree, collecting every problem instead of stopping at one."""

    def __init__(self, tree, path):
        self.tree, self.path, self.errors = tree, path, []

    def _raw(self, key):
        node = self.tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(key)
            node = node[part]
        return node

    def has(self, key):
        try:
            self._raw(key)
        except KeyError:
            return False
        return True

    def get(self, key, value_type, lo=None, hi=None, nullable=False, default=...):
        try:
            value = self._raw(key)
        except KeyError:
            if default is not ...:
                return default
            self.errors.append(f"{key}: missing")
            return None
        if value is None and nullable:
            return None
        ok = isinstance(value, value_type) and not (value_type in (int, float) and isinstance(value, bool))
        if value_type is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        bounds = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
        expected = f"{value_type.__name__}{bounds}" + (" or null" if nullable else "")
        if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
            self.errors.append(f"{key}: got {value!r}, expected {expected}")
            return None
        return value

    def float_range(self, key, lo, hi, value_type=float):
        """[low, high] with lo <= low <= high <= hi."""
        value = self.get(key, list)
        if value is None:
            return ()
        numbers = all(
            isinstance(v, int if value_type is int else int | float) and not isinstance(v, bool) for v in value
        )
        if len(value) != 2 or not numbers or not lo <= value[0] <= value[1] <= hi:
            self.errors.append(
                f"{key}: got {value!r}, expected [low, high] of {value_type.__name__} with {lo} <= low <= high <= {hi}"
            )
            return ()
        return tuple(value)

    def float_list(self, key, lo, hi):
        values = self.get(key, list)
        if values is None:
            return ()
        if not values or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and lo <= v <= hi for v in values
        ):
            self.errors.append(f"{key}: got {values!r}, expected a non-empty list of numbers in [{lo}, {hi}]")
            return ()
        return tuple(float(v) for v in values)

    def int_list(self, key, lo, hi):
        values = self.get(key, list)
        if values is None:
            return ()
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in values):
            self.errors.append(f"{key}: got {values!r}, expected a non-empty list of int in [{lo}, {hi}]")
            return ()
        return tuple(values)


# The shifts: the ways real handwriting and capture differ from MNIST, each named once, with the
# type and valid range of its strength. Each has a function of the same name in pipeline/core/shifts/
# corruptions.py. params.yaml's `shifts` section gives each a [low, high] strength, drawn per image,
# used by the robustness stage (test copies), calibrate (validation copies) and a model's
# augmentation (its `augment.shifts`).
SHIFTS = {
    "shear": (float, 0.0, 2.0),  # slant: horizontal shear factor, either way
    "rotation": (float, 0.0, 180.0),  # degrees either way
    "elastic": (float, 0.0, 100.0),  # a hand's wobble: scale of a smooth random displacement field
    "scale": (float, 0.1, 3.0),  # factor about the centre
    "translation": (float, 0.0, 14.0),  # off-centre: pixels, in a random direction
    "cut": (float, 0.0, 14.0),  # moved this many pixels toward one edge, cut by the frame
    "thick": (float, 0.0, 4.0),  # strokes widened by this many pixels, drawn at 4x resolution
    "thin": (float, 0.0, 4.0),  # strokes narrowed by this many pixels, drawn at 4x resolution
    "blur": (float, 0.0, 5.0),  # Gaussian sigma, pixels
    "noise": (float, 0.0, 1.0),  # standard deviation of added Gaussian noise
    "lighting": (float, 0.0, 1.0),  # paper brightness at the lit edge of a gradient, with its texture
    "jpeg": (int, 1, 95),  # JPEG quality
    "low_resolution": (int, 2, 27),  # side of a copy *sampled* down (thin strokes alias away), enlarged again
    "anti_aliased": (int, 2, 27),  # side of a copy area-averaged down, as scanners do, enlarged bicubic
}


def _shifts(r):
    return ShiftParams(
        seed=r.get("shifts.seed", int, 0, 2**31 - 1),
        strengths={
            name: r.float_range(f"shifts.{name}", lo, hi, value_type) for name, (value_type, lo, hi) in SHIFTS.items()
        },
    )


def _training(r, section):
    return dict(
        dropout=r.get(f"{section}.dropout", float, 0.0, 0.9),
        batch_size=r.get(f"{section}.batch_size", int, 1, 60000),
        learning_rate=r.get(f"{section}.learning_rate", float, 1e-6, 1.0),
        weight_decay=r.get(f"{section}.weight_decay", float, 0.0, 1.0),
        warmup_epochs=r.get(f"{section}.warmup_epochs", int, 0, 1000),
        label_smoothing=r.get(f"{section}.label_smoothing", float, 0.0, 0.5),
        ema_momentum=r.get(f"{section}.ema_momentum", float, 0.0, 0.99999),
        augment=_augment(r, f"{section}.augment"),
    )


def _augment(r, section):
    shifts = r.get(f"{section}.shifts", list, default=[])
    unknown = [name for name in shifts if name not in SHIFTS]
    if unknown:
        r.errors.append(f"{section}.shifts: unknown {unknown}, expected names from {list(SHIFTS)}")
    share = r.get(f"{section}.shift_share", float, 0.0, 1.0)
    if share and not shifts:
        r.errors.append(f"{section}.shifts: empty, but shift_share is {share}: name the shifts to draw")
    return AugmentParams(
        rotation_degrees=r.get(f"{section}.rotation_degrees", float, 0.0, 45.0),
        shift_fraction=r.get(f"{section}.shift_fraction", float, 0.0, 0.3),
        zoom_fraction=r.get(f"{section}.zoom_fraction", float, 0.0, 0.3),
        shift_share=share,
        shifts=tuple(shifts),
        printed_share=r.get(f"{section}.printed_share", float, 0.0, 1.0),
    )


def _mlp(r):
    return MLPParams(hidden_units=r.int_list("mlp.hidden_units", 1, 8192), **_training(r, "mlp"))


def _cnn(r):
    filters, convs = r.int_list("cnn.filters", 1, 1024), r.int_list("cnn.convs_per_block", 1, 4)
    if len(filters) > 4:
        r.errors.append(f"cnn.filters: got {len(filters)} blocks, expected at most 4 (each halves 28x28)")
    if filters and convs and len(convs) != len(filters):
        r.errors.append(
            f"cnn.convs_per_block: got {len(convs)} entries, expected one per entry of cnn.filters ({len(filters)})"
        )
    arch = r.get("cnn.arch", str)
    if arch is not None and arch not in ARCHS:
        r.errors.append(f"cnn.arch: got {arch!r}, expected one of {list(ARCHS)}")
    return CNNParams(
        arch=arch,
        filters=filters,
        convs_per_block=convs,
        dense_units=r.get("cnn.dense_units", int, 1, 8192),
        **_training(r, "cnn"),
    )


def read_tree(path="params.yaml"):
    """params.yaml as plain YAML, unchecked."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found (run from the project root)")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None


def with_overrides(tree, overrides):
    """A copy of the tree with {dotted key: value} set, as `dvc exp run -S key=value` would.
    A key whose parent section does not exist is refused, naming it."""
    tree = copy.deepcopy(tree)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = tree
        for i, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node:
                raise ParamsError(f"{key}: no section {'.'.join(parents[: i + 1])!r} in params.yaml")
            node = node[part]
        if not isinstance(node, dict) or leaf not in node:
            raise ParamsError(f"{key}: no such key in params.yaml")
        node[leaf] = value
    return tree


def load(path="params.yaml", overrides=None):
    """params.yaml, checked, with optional {dotted key: value} overrides."""
    return from_tree(with_overrides(read_tree(path), overrides or {}), path)


def from_tree(tree, path="params.yaml"):
    r = _Reader(tree, path)

    sources = r.get("fetch.sources", list) or []
    unknown = [s for s in sources if s not in SOURCES]
    if not sources or unknown:
        r.errors.append(f"fetch.sources: got {sources!r}, expected a non-empty list drawn from {list(SOURCES)}")
    val_size = r.get("preprocess.val_size", int, 10, 30000)
    max_train = r.get("preprocess.max_train_images", int, 100, 60000, nullable=True)
    if val_size and max_train and val_size >= max_train:
        r.errors.append(
            f"preprocess.val_size: got {val_size}, expected less than preprocess.max_train_images ({max_train})"
        )

    params = Params(
        epochs=r.get("epochs", int, 1, 1000),
        seed=r.get("seed", int, 0, 2**31 - 1),
        fetch=FetchParams(
            sources=tuple(sources),
            local_dir=r.get("fetch.local_dir", str, nullable=True),
            mirrors=tuple(r.get("fetch.mirrors", list) or ()),
            timeout_seconds=r.get("fetch.timeout_seconds", float, 0.1, 600.0),
        ),
        preprocess=PreprocessParams(
            val_size=val_size,
            max_train_images=max_train,
            max_test_images=r.get("preprocess.max_test_images", int, 10, 10000, nullable=True),
        ),
        mlflow=MLflowParams(experiment=r.get("mlflow.experiment", str)),
        mlp=_mlp(r),
        cnn=_cnn(r),
        calibrate=CalibrateParams(
            accepted_accuracy=r.get("calibrate.accepted_accuracy", float, 0.5, 1.0),
            accepted_accuracy_under_shift=r.get("calibrate.accepted_accuracy_under_shift", float, 0.5, 1.0),
            soft_share_of_clean=r.float_list("calibrate.soft_share_of_clean", 0.0001, 0.5),
            smooth_below=r.float_list("calibrate.smooth_below", 0.0, 2.0),
            nondigits_per_kind=r.get("calibrate.nondigits_per_kind", int, 10, 100000),
            digit_flag_rate=r.get("calibrate.digit_flag_rate", float, 0.0, 0.5),
            bootstrap_resamples=r.get("calibrate.bootstrap_resamples", int, 0, 1000),
        ),
        evaluate=EvaluateParams(
            batch_size=r.get("evaluate.batch_size", int, 1, 10000),
            nondigits_per_kind=r.get("evaluate.nondigits_per_kind", int, 10, 100000),
        ),
        shifts=_shifts(r),
        read=ReadParams(
            seed=r.get("read.seed", int, 0, 2**31 - 1),
            training_lines=r.get("read.training_lines", int, 10, 1_000_000),
            validation_lines=r.get("read.validation_lines", int, 10, 100_000),
            validation_numbers_per_kind=r.get("read.validation_numbers_per_kind", int, 1, 100_000),
            validation_numbers_per_length=r.get("read.validation_numbers_per_length", int, 1, 100_000),
            epochs=r.get("read.epochs", int, 1, 1000),
            batch_size=r.get("read.batch_size", int, 1, 4096),
            learning_rate=r.get("read.learning_rate", float, 1e-6, 1.0),
            accepted_accuracy=r.get("read.accepted_accuracy", float, 0.5, 1.0),
            accepted_accuracy_lines=r.get("read.accepted_accuracy_lines", float, 0.5, 1.0),
        ),
        read_eval=ReadEvalParams(
            seed=r.get("read_eval.seed", int, 0, 2**31 - 1),
            strings_per_kind=r.get("read_eval.strings_per_kind", int, 1, 100000),
            strings_per_length=r.get("read_eval.strings_per_length", int, 1, 100000),
        ),
        visualize=VisualizeParams(grid_images=r.get("visualize.grid_images", int, 4, 100)),
    )
    if r.errors:
        raise ParamsError(f"{path} has invalid values:\n  " + "\n  ".join(r.errors))
    return params


def run_stage(stage, work, expected=()):
    """A stage's entry point: params.yaml checked, then `work(params)`. A bad params.yaml, missing
    input data or another `expected` failure ends the stage as `<stage>: <message>`, not a traceback."""
    try:
        return work(load())
    except (ParamsError, DataError, *expected) as e:
        raise SystemExit(f"{stage}: {e}") from None
