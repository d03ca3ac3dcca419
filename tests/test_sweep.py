"""The sweep's pieces that need no cluster: the search space from the command line and a file,
the summary per variant, and the `dvc exp run` line it ends with."""

import math

import pytest

from pipeline.scale import sweep


def test_search_space_from_flags_and_a_file(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("cnn.dropout: [0.2, 0.3]\ncnn.learning_rate: {loguniform: [0.001, 0.01]}\n")
    space = sweep.search_space(
        ["cnn.convs_per_block=[1,1,1],[1,2,1]", "cnn.arch=plain,resnet"],
        [("choice", ["mlp.dropout=0.1,0.4"]), ("uniform", ["cnn.weight_decay=0,0.02"])],
        space_file,
    )
    assert space["cnn.convs_per_block"] == {"grid_search": [[1, 1, 1], [1, 2, 1]]}
    assert space["cnn.arch"] == {"grid_search": ["plain", "resnet"]}
    assert space["cnn.dropout"] == {"grid_search": [0.2, 0.3]}
    assert space["mlp.dropout"].categories == [0.1, 0.4]
    assert (space["cnn.weight_decay"].lower, space["cnn.weight_decay"].upper) == (0.0, 0.02)
    assert space["cnn.learning_rate"].lower == pytest.approx(0.001)


@pytest.mark.parametrize(
    "flag, message",
    [(["cnn.arch"], "expected KEY=VALUE"), ([], "expected a list")],
)
def test_a_malformed_space_is_refused_naming_it(tmp_path, flag, message):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("cnn.dropout: 0.3\n")
    with pytest.raises(ValueError, match=message):
        sweep.search_space(flag, [], None if flag else space_file)


def test_summary_per_variant_over_seeds_with_failures_counted():
    def result(dropout, seed, accuracy, status="FINISHED"):
        metrics = {
            "val_accuracy": accuracy,
            "val_corrupted_mean_accuracy": 0.9,
            "val_corrupted_low_resolution_accuracy": 0.8,
            "val_not_sure_coverage": 0.95,
            "final": True,
        }
        return {
            "config": {"cnn.dropout": dropout, "seed": seed},
            "metrics": {**metrics, "train_seconds": 10.0},
            "status": status,
        }

    stopped_early = {"config": {"cnn.dropout": 0.2, "seed": 3}, "metrics": {"val_accuracy": 0.9}, "status": "FINISHED"}
    rows = sweep.summarize(
        [
            result(0.2, 1, 0.990),
            result(0.2, 2, 0.994),
            result(0.3, 1, 0.995),
            result(0.3, 2, 0.0, "FAILED"),
            stopped_early,
        ]
    )
    assert [r["variant"] for r in rows] == ["cnn.dropout=0.3", "cnn.dropout=0.2"]  # best mean first
    assert (rows[1]["trials"], rows[1]["stopped"]) == (2, 1) and rows[1]["val_accuracy_mean"] == pytest.approx(0.992)
    assert rows[1]["val_accuracy_sd"] == pytest.approx(math.sqrt(2) * 0.002)
    assert (rows[0]["trials"], rows[0]["failed"]) == (1, 1)


def test_the_best_variant_becomes_a_dvc_exp_run_line():
    line = sweep.exp_run_line({"cnn.arch": "resnet", "cnn.convs_per_block": [1, 2, 1], "epochs": 5})
    assert line == "dvc exp run -S 'cnn.arch=resnet' -S 'cnn.convs_per_block=[1, 2, 1]' -S 'epochs=5'"
