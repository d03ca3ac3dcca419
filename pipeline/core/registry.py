"""The MLflow Model Registry: each trained model a version of digits-<model>, and the alias
`champion`, which serving uses, moved only on evidence measured on validation."""

import time

CHAMPION = "champion"


def registered_name(model):
    return f"digits-{model}"


def register(model, model_uri, tags, name=None):
    """Register a logged model as a new version of `name` (default digits-<model>); returns the version."""
    import mlflow

    name = name or registered_name(model)
    return mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})


def champion_of(name):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def crown_if_better(version):
    """Move `champion` to `version` if there is none yet, or if `version` has the higher validation
    accuracy on the same validation images. Returns the sentence that says what happened.

    Training stages of parallel experiments may judge against the same champion at once. So after
    a move, the best of all versions registered since that champion (on the same images) takes the
    alias, whichever stage moves last."""
    champion = champion_of(version.name)
    verdict, better = _judge(version, champion)
    if not better:
        return verdict
    set_champion(version)
    best = max(
        _contenders(version, since=int(champion.version) if champion else 0),
        key=lambda v: (float(v.tags["val_accuracy"]), -int(v.version)),
    )
    if best.version == version.version:
        return verdict
    set_champion(best)
    return (
        f"{verdict}, but v{best.version} of a parallel run is better (val accuracy "
        f"{float(best.tags['val_accuracy']):.4f}): champion is v{best.version}"
    )


def _contenders(version, since):
    from mlflow.tracking import MlflowClient

    versions = MlflowClient().search_model_versions(f"name='{version.name}'")
    return [
        v
        for v in versions
        if int(v.version) > since
        and "val_accuracy" in v.tags
        and v.tags.get("val_digest") == version.tags["val_digest"]
    ]


def set_champion(version, attempts=3):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    for attempt in range(attempts):
        try:
            return MlflowClient().set_registered_model_alias(version.name, CHAMPION, version.version)
        except MlflowException:
            # Two first champions at once: PostgreSQL refuses the second insert; it is an update now.
            if attempt == attempts - 1:
                raise
            time.sleep(1)


def promote(name, version):
    """Move `name`'s champion alias to `version` by hand: (the champion before, the version now)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.core import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    chosen = MlflowClient().get_model_version(name, str(version))
    before = champion_of(name)
    set_champion(chosen)
    return before, chosen


def _judge(version, champion):
    """(what happens, whether `version` should become the champion)."""
    name, accuracy = version.name, float(version.tags["val_accuracy"])
    if champion is None:
        return f"{name} v{version.version} is the first champion (val accuracy {accuracy:.4f})", True
    if champion.tags.get("val_digest") != version.tags["val_digest"]:
        return (
            f"{name} v{version.version}: champion stays v{champion.version}: they were validated on different "
            f"images, so their accuracies do not compare (`digits promote {name} {version.version}` moves it)"
        ), False
    if accuracy > float(champion.tags["val_accuracy"]):
        return (
            f"{name} v{version.version} is the new champion: val accuracy {accuracy:.4f} beats "
            f"v{champion.version}'s {float(champion.tags['val_accuracy']):.4f}"
        ), True
    return (
        f"{name} v{version.version}: champion stays v{champion.version} (val accuracy "
        f"{float(champion.tags['val_accuracy']):.4f}; this one {accuracy:.4f})"
    ), False
