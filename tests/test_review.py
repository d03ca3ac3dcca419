import csv
import json
import threading

import pytest
from PIL import Image

from pipeline import cli
from pipeline.serving import finetune, review
from tests.helpers import draw_digit_seven


def scans(folder, count):
    folder.mkdir(parents=True)
    for i in range(count):
        draw_digit_seven(offset=(20 * i, 10 * i)).save(folder / f"{i}.png")
    return folder


def test_predict_review_queues_every_answer_that_is_not_sure_with_a_copy_and_an_empty_label(
    model_file, tmp_path, capsys
):
    folder = scans(tmp_path / "writer_a", 3)
    queue = tmp_path / "queue"

    assert (
        cli.main(["predict", str(folder), "--model", str(model_file), "--format", "json", "--review", str(queue)]) == 0
    )
    answers = json.loads(capsys.readouterr().out)
    rows = review.read_rows(queue)

    # An untrained model is never sure (conftest.model_file): every answer waits for a person.
    assert [a["not_sure"] for a in answers["predictions"]] == [True] * 3
    assert [r["source"] for r in rows] == [a["file"] for a in answers["predictions"]]
    for row, answer in zip(rows, answers["predictions"], strict=True):
        assert row["label"] == "" and row["kind"] == "digit" and row["group"] == "writer_a"
        assert row["answer"] == str(answer["digit"]) and row["model"] == answers["model"]
        assert (queue / row["file"]).read_bytes() == (folder / f"{rows.index(row)}.png").read_bytes()

    assert cli.main(["review", str(queue)]) == 0
    assert "3 waiting, 0 filled, of 3" in capsys.readouterr().out


def test_a_second_run_appends_and_a_folder_of_another_layout_is_refused(model_file, tmp_path, capsys):
    folder = scans(tmp_path / "scans", 2)
    queue = tmp_path / "queue"
    for _ in range(2):
        assert cli.main(["predict", str(folder), "--model", str(model_file), "--review", str(queue)]) == 0
    assert len(review.read_rows(queue)) == 4
    assert len(list((queue / review.IMAGES).iterdir())) == 4  # names from the queue: no copy overwritten

    other = tmp_path / "other"
    other.mkdir()
    (other / review.LABELS).write_text("file,label\na.png,3\n")
    capsys.readouterr()
    assert cli.main(["predict", str(folder), "--model", str(model_file), "--review", str(other)]) == 2
    assert "other/labels.csv: expected the columns file, label, answer" in capsys.readouterr().err
    assert (other / review.LABELS).read_text() == "file,label\na.png,3\n"


def test_rows_written_at_once_by_many_threads_are_all_there_and_whole(tmp_path):
    image = tmp_path / "seven.png"
    draw_digit_seven().save(image)
    queues = [review.ReviewQueue(tmp_path / "queue", "model-a") for _ in range(8)]  # one per writer, one file

    def write(queue, writer):
        for i in range(25):
            queue.add(image, "digit", writer, i / 25, not_a_digit=i % 2 == 0)

    threads = [threading.Thread(target=write, args=(q, n)) for n, q in enumerate(queues)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = review.read_rows(tmp_path / "queue")
    assert len(rows) == 200 and len({r["file"] for r in rows}) == 200
    assert sorted((r["answer"], r["confidence"]) for r in rows) == sorted(
        (str(n), f"{i / 25:.4f}") for n in range(8) for i in range(25)
    )
    with (tmp_path / "queue" / review.LABELS).open(newline="") as f:
        assert all(len(line) == len(review.COLUMNS) for line in csv.reader(f))


def test_finetune_reads_the_filled_digit_rows_of_a_review_folder_by_group(model_file, tmp_path, capsys):
    queue = tmp_path / "queue"
    for writer in ("anna", "ben"):
        folder = scans(tmp_path / writer, 3)
        assert cli.main(["predict", str(folder), "--model", str(model_file), "--review", str(queue)]) == 0
    rows = review.read_rows(queue)
    rows[0]["label"], rows[1]["label"], rows[3]["label"], rows[4]["label"] = "7", review.NO_DIGIT, " 7", "1"
    with (queue / review.LABELS).open("w", newline="") as f:
        writer = csv.DictWriter(f, review.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    labelled = finetune.labelled_files(queue)
    assert [(p.name, label, group) for p, label, group in labelled] == [
        (rows[i]["file"].split("/")[-1], label, group)
        for i, label, group in ((0, 7, "anna"), (3, 7, "ben"), (4, 1, "ben"))
    ]
    capsys.readouterr()
    assert cli.main(["review", str(queue), "--show", "filled"]) == 0
    assert "2 waiting, 4 filled, of 6" in capsys.readouterr().out

    rows[2]["label"] = "seven"
    with (queue / review.LABELS).open("w", newline="") as f:
        writer = csv.DictWriter(f, review.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(finetune.FinetuneError, match="labels.csv line 4: label 'seven' is not a digit"):
        finetune.labelled_files(queue)


def test_review_sure_queues_the_sure_answers_labelled_with_their_answer_for_finetune(
    trained_model_file, mnist, tmp_path, capsys
):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(12):  # MNIST test digits as a scan has them: dark ink on white paper
        Image.fromarray(255 - mnist["x_test"][i]).save(folder / f"{i}.png")
    queue = tmp_path / "queue"
    predict = ["predict", str(folder), "--model", str(trained_model_file), "--format", "json", "--review", str(queue)]

    assert cli.main([*predict, "--review-sure"]) == 0
    answers = json.loads(capsys.readouterr().out)["predictions"]
    rows = {row["source"]: row for row in review.read_rows(queue)}

    sure = [a for a in answers if not a["not_sure"]]
    assert sure and set(rows) == {a["file"] for a in answers}  # every answer is in the folder
    for answer in answers:
        row = rows[answer["file"]]
        if answer["not_sure"]:  # waits for a person, as without --review-sure
            assert row["label"] == "" and row["reason"] in ("not sure", "not a digit")
        else:  # labelled with the model's own answer
            assert row["label"] == row["answer"] == str(answer["digit"]) and row["reason"] == review.SURE
    assert len(finetune.labelled_files(queue)) == finetune.own_answers(queue) == len(sure)

    assert cli.main(["review", str(queue)]) == 0
    shown = capsys.readouterr().out
    waiting = len(answers) - len(sure)
    assert f"{waiting} waiting, 0 filled, of {len(answers)}" in shown
    assert f"{len(sure)} sure, labelled with the model's answer" in shown
    assert cli.main(["predict", str(folder), "--model", str(trained_model_file), "--review-sure"]) == 2
    assert "--review-sure adds the sure answers to a review folder" in capsys.readouterr().err


def test_read_review_queues_numbers_that_are_not_sure(trained_model_file, trained_reader_file, tmp_path, capsys):
    folder = tmp_path / "forms"
    folder.mkdir()
    Image.new("L", (120, 40), 255).save(folder / "blank.png")  # refused: no row
    scribble = Image.new("L", (120, 40), 255)
    scribble.paste(0, (10, 18, 110, 22))  # a long dash: no number it could be sure of
    scribble.save(folder / "dash.png")
    args = ["read", str(folder), "--model", str(trained_model_file), "--reader", str(trained_reader_file)]

    assert cli.main([*args, "--format", "json", "--review", str(tmp_path / "queue")]) == 1  # the blank page
    out, err = capsys.readouterr()
    readings = json.loads(out)["readings"]
    assert "blank.png: no digit found" in err and [r["file"] for r in readings] == [str(folder / "dash.png")]
    rows = review.read_rows(tmp_path / "queue")
    assert len(rows) >= 1 and [r["source"] for r in rows] == [r["file"] for r in readings if not r["sure"]]
    assert all(r["kind"] == "number" and r["label"] == "" for r in rows)
