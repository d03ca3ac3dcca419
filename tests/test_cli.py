import csv
import io
import json
import os
import subprocess
import sys

from PIL import Image

from pipeline import cli
from pipeline.serving import images
from tests.helpers import draw_digit_seven


def test_predict_files_and_folders_in_every_format(model_file, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    draw_digit_seven().save(folder / "a.png")
    draw_digit_seven(offset=(200, 100)).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    single = tmp_path / "c.bmp"
    draw_digit_seven(ink=(240,) * 3, paper=(0,) * 3).save(single)

    assert (
        cli.main(["predict", str(folder), str(single), "--model", str(model_file), "--format", "json", "--top-k", "3"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert [p["file"] for p in result["predictions"]] == [str(folder / "a.png"), str(folder / "b.jpg"), str(single)]
    for p in result["predictions"]:
        assert p["digit"] == p["top"][0]["digit"] and len(p["top"]) == 3
        assert p["not_sure"] is True  # an untrained model is never sure (see conftest.model_file)
        assert p["top"][0]["probability"] >= p["top"][1]["probability"] >= p["top"][2]["probability"]


def test_bad_files_fail_clearly_while_the_rest_are_answered(model_file, tmp_path, capsys):
    good = tmp_path / "good.png"
    draw_digit_seven().save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    blank = tmp_path / "blank.png"
    Image.new("L", (60, 60), 255).save(blank)

    code = cli.main(
        [
            "predict",
            str(broken),
            str(good),
            str(tmp_path / "missing.png"),
            str(blank),
            "--model",
            str(model_file),
            "--format",
            "csv",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][:4] == ["file", "digit", "confidence", "not_sure"] and [r[0] for r in rows[1:]] == [str(good)]
    assert rows[1][3] == "True"
    assert f"{broken}: not an image" in err
    assert f"{tmp_path / 'missing.png'}: No such file or directory" in err
    assert "blank" in err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    draw_digit_seven().save(tmp_path / "a.png")
    assert cli.main(["predict", str(tmp_path / "a.png"), "--model", str(tmp_path / "none.keras")]) == 2
    assert "none.keras: no such model file" in capsys.readouterr().err


def test_tensorflow_start_up_notices_and_python_warnings_are_held_back():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    # Seven lengths make TensorFlow warn about tf.function retracing, as Keras' predict does.
    code = (
        "import pipeline, tensorflow as tf; double = tf.function(lambda x: 2 * x)\n"
        "print([int(double(tf.ones((n,))).shape[0]) for n in range(1, 8)][-1])"
    )
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "7"
    assert quiet.stderr == ""


def test_a_large_folder_is_decoded_in_parallel_in_order_with_bad_files_named(model_file, tmp_path, capsys):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(images.PARALLEL_FROM + 10):
        draw_digit_seven(120, 100, offset=(10 + i % 20, 10)).save(folder / f"{i:04d}.png")
    (folder / "0100.png").write_bytes(b"not a png")
    assert cli.main(["predict", str(folder), "--model", str(model_file)]) == 1
    out, err = capsys.readouterr()
    files = [line.split("\t")[0] for line in out.splitlines()]
    expected = [str(p) for p in sorted(folder.iterdir()) if p.name != "0100.png"]
    assert files == expected
    assert f"{folder / '0100.png'}: not an image" in err


def test_score_refuses_bad_actor_flags_before_starting_ray(tmp_path, capsys):
    for flags, message in [
        (["--actors", "0"], "--actors 0: expected 1 or more"),
        (["--cpus-per-actor", "0"], "--cpus-per-actor 0: expected more than 0"),
    ]:
        assert cli.main(["score", str(tmp_path), "--out", str(tmp_path / "answers.csv"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "answers.csv").exists()
