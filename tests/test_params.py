import pytest

from pipeline.core import params
from tests.helpers import ROOT


def test_default_params_load(project):
    p = params.load()
    assert 10 <= p.epochs <= 20
    assert p.fetch.sources[-1] == "pypi"
    assert p.cnn.name == "cnn" and p.mlp.name == "mlp"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("epochs", 0, "epochs: got 0, expected int in [1, 1000]"),
        ("epochs", "ten", "epochs: got 'ten', expected int in [1, 1000]"),
        ("epochs", True, "epochs: got True"),
        ("cnn__dropout", 1.5, "cnn.dropout: got 1.5, expected float in [0.0, 0.9]"),
        ("cnn__weight_decay", -0.01, "cnn.weight_decay: got -0.01, expected float in [0.0, 1.0]"),
        ("mlp__hidden_units", [], "mlp.hidden_units: got [], expected a non-empty list"),
        ("cnn__augment__rotation_degrees", -5, "cnn.augment.rotation_degrees: got -5.0"),
        ("cnn__augment__shift_share", 1.5, "cnn.augment.shift_share: got 1.5, expected float in [0.0, 1.0]"),
        ("mlp__augment__printed_share", -0.1, "mlp.augment.printed_share: got -0.1, expected float in [0.0, 1.0]"),
        ("cnn__augment__shifts", ["smudge"], "cnn.augment.shifts: unknown ['smudge'], expected names from"),
        (
            "shifts__jpeg",
            [5.5, 9],
            "shifts.jpeg: got [5.5, 9], expected [low, high] of int with 1 <= low <= high <= 95",
        ),
        ("shifts__blur", [2, 1], "shifts.blur: got [2, 1], expected [low, high] of float"),
        ("fetch__sources", ["ftp"], "fetch.sources: got ['ftp'], expected a non-empty list drawn from"),
        ("preprocess__val_size", 5, "preprocess.val_size: got 5, expected int in [10, 30000]"),
        ("read__accepted_accuracy_lines", 1.2, "read.accepted_accuracy_lines: got 1.2, expected float in [0.5, 1.0]"),
    ],
)
def test_bad_value_names_key_and_allowed_range(project, key, value, message):
    project(**{key: value})
    with pytest.raises(params.ParamsError) as error:
        params.load()
    assert message in str(error.value)


def test_every_problem_is_reported_at_once(project):
    project(epochs=-1, seed="x", mlp__batch_size=0)
    with pytest.raises(params.ParamsError) as error:
        params.load()
    assert all(key in str(error.value) for key in ("epochs:", "seed:", "mlp.batch_size:"))


def test_missing_key_and_missing_file(project, tmp_path):
    project.path.joinpath("params.yaml").write_text("epochs: 3\n")
    with pytest.raises(params.ParamsError, match="seed: missing"):
        params.load()
    with pytest.raises(params.ParamsError, match="not found"):
        params.load(tmp_path / "nope.yaml")


def test_stage_entry_point_exits_with_the_message(project):
    project(epochs=0)
    with pytest.raises(SystemExit) as stop:
        params.run_stage("train cnn", lambda settings: None)
    assert str(stop.value).startswith("train cnn: ") and "epochs: got 0" in str(stop.value)


def test_a_shift_share_needs_shifts_to_draw():
    """The MLP's recipe draws no shifts and names none; a share without them is refused by name."""
    tree = params.read_tree(ROOT / "params.yaml")
    assert params.from_tree(tree).mlp.augment.shifts == ()
    tree["mlp"]["augment"]["shift_share"] = 0.2
    with pytest.raises(params.ParamsError, match="mlp.augment.shifts: empty, but shift_share is 0.2"):
        params.from_tree(tree)
