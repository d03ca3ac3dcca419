import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bench.servers import serve_in_background
from pipeline.core import normalize
from pipeline.serving import batcher as batching
from pipeline.serving import limits
from pipeline.serving.api import create_app
from pipeline.serving.predictor import Predictor
from tests.helpers import ROOT, draw_digit_seven


@pytest.fixture(scope="module")
def predictor(model_file):
    return Predictor(model_file)


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor)) as client:  # `with`: the app's start-up runs (model batcher)
        yield client


def png(image, fmt="PNG"):
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def test_health_and_page_and_docs(client, predictor):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == predictor.identity
    assert predictor.identity.startswith("sha256:")
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP"])
@pytest.mark.parametrize("inverted", [False, True])
def test_upload_answers_digit_probabilities_and_model(client, predictor, fmt, inverted):
    image = draw_digit_seven(ink=(235,) * 3, paper=(10,) * 3) if inverted else draw_digit_seven()
    response = client.post(
        "/predict", files={"file": (f"seven.{fmt.lower()}", png(image, fmt), f"image/{fmt.lower()}")}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = predictor.probabilities([normalize.to_mnist(normalize.decode(png(image, fmt)))])[0]
    assert body["digit"] == int(expected.argmax()) and len(body["probabilities"]) == 10
    assert np.allclose(body["probabilities"], expected, atol=1e-5)
    assert abs(sum(body["probabilities"]) - 1) < 1e-4 and body["model"] == predictor.identity


def test_answers_carry_the_models_calibration_and_say_when_not_sure(client, predictor, model_file):
    import keras

    from pipeline.core.trust.confidence import with_temperature
    from tests.conftest import CALIBRATION_TEMPERATURE

    pixels = normalize.to_mnist(draw_digit_seven())
    own = keras.models.load_model(model_file, compile=False).predict(pixels.reshape(1, 28, 28, 1), verbose=0)
    body = client.post("/predict", json={"pixels": pixels.tolist()}).json()
    np.testing.assert_allclose(body["probabilities"], with_temperature(own, CALIBRATION_TEMPERATURE)[0], atol=1e-5)
    # An untrained model is far below the 0.9 threshold: the best guess comes marked "not sure".
    assert body["confidence"] < 0.9 and body["not_sure"] is True
    assert client.get("/health").json()["calibration"] == {
        "temperature": CALIBRATION_TEMPERATURE,
        "not_sure_below": 0.9,
        "accepted_accuracy": 0.999,
    }


def test_a_long_line_is_not_a_digit_and_a_seven_is(client):
    from PIL import ImageDraw

    line = Image.new("L", (600, 200), 255)
    ImageDraw.Draw(line).line([(20, 100), (580, 100)], fill=0, width=8)
    answers = client.post(
        "/predict/batch",
        files=[
            ("files", ("line.png", png(line), "image/png")),
            ("files", ("seven.png", png(draw_digit_seven()), "image/png")),
        ],
    ).json()["predictions"]
    assert [(a["file"], a["not_a_digit"]) for a in answers] == [("line.png", True), ("seven.png", False)]
    assert answers[0]["not_sure"] and len(answers[0]["probabilities"]) == 10  # still a best guess


def test_a_calibration_fitted_to_another_model_is_refused_and_none_means_the_models_own(model_file, tmp_path, capsys):
    other = tmp_path / "cnn.keras"
    other.write_bytes(model_file.read_bytes() + b" ")  # another file: its sha256 differs
    other.with_name("cnn.calibration.json").write_text(model_file.with_name("cnn.calibration.json").read_text())
    with pytest.raises(ValueError, match="cnn.calibration.json was fitted to another cnn.keras"):
        Predictor(other, "tf")
    other.write_bytes(model_file.read_bytes())
    other.with_name("cnn.gate.pkl").write_bytes(b"another gate")
    with pytest.raises(ValueError, match="cnn.gate.pkl is not the gate"):
        Predictor(other, "tf")

    uncalibrated = tmp_path / "plain" / "cnn.keras"
    uncalibrated.parent.mkdir()
    uncalibrated.write_bytes(model_file.read_bytes())
    predictor = Predictor(uncalibrated, "tf")
    assert "no calibration found" in capsys.readouterr().err
    assert predictor.temperature == 1.0 and predictor.graph.gate is None
    # Without a calibration no answer is "not sure", however unsure the model is.
    assert not predictor.not_sure(np.full(10, 0.1, np.float32), False)


def test_the_onnx_graph_belongs_to_its_keras_file_and_serves_alone(model_file, tmp_path):
    other = tmp_path / "cnn.keras"
    other.write_bytes(model_file.read_bytes() + b" ")
    with pytest.raises(FileNotFoundError, match="no ONNX export of this model .*--runtime tf"):
        Predictor(other)
    other.with_suffix(".onnx").write_bytes(model_file.with_suffix(".onnx").read_bytes())
    with pytest.raises(ValueError, match="cnn.onnx was exported from another cnn.keras; run `dvc repro export`"):
        Predictor(other)
    other.unlink()  # the .onnx file holds the calibration and the gate: it is all serving needs
    alone = Predictor(other.with_suffix(".onnx"))
    assert alone.identity == Predictor(model_file).identity
    fitted = Predictor(model_file, "tf").calibration
    assert alone.calibration == {key: fitted[key] for key in alone.calibration}


def test_threads_come_from_the_environment_and_a_bad_value_is_named(model_file, monkeypatch):
    monkeypatch.setenv("DIGITS_THREADS", "")
    assert Predictor(model_file).predict(np.zeros((1, 28, 28), np.float32))[0].shape == (1, 10)
    for bad in ("two", "0", "-1"):
        monkeypatch.setenv("DIGITS_THREADS", bad)
        with pytest.raises(ValueError, match=f"DIGITS_THREADS='{bad}': expected a whole number of threads"):
            Predictor(model_file)


def test_onnx_runtime_answers_as_tensorflow_does(model_file):
    """Digits and "not a digit" the same, probabilities within 1e-5, on drawn sevens, blurred and
    noisy copies of them (the soft temperature for the blurred only) and on generated non-digits
    (which the gate flags)."""
    from scipy import ndimage

    from pipeline.core.trust import confidence, gate, nondigits
    from tests.conftest import varied_sevens

    sevens = [normalize.to_mnist(image) for image in varied_sevens(50, seed=7)]
    blurred = [ndimage.gaussian_filter(seven, 1.5) for seven in sevens[:20]]
    noise = np.random.default_rng(0).normal(0, 0.2, (20, 28, 28))
    noisy = list(np.clip(np.stack(sevens[20:40]) * 0.45 + noise, 0, 1).astype(np.float32))
    others = list(
        gate.to_mnist_forms([i for group in nondigits.generate(5, 3, np.stack(sevens)).values() for i in group])
    )
    calibration = Predictor(model_file).calibration
    soft = np.asarray(confidence.temperatures(np.stack(blurred + noisy), calibration)) > calibration["temperature"]
    assert soft[:20].mean() > 0.5 and not soft[20:].any()
    images = np.stack(sevens + blurred + noisy + [o[..., 0] for o in others])
    onnx_probabilities, onnx_flags = Predictor(model_file).predict(images)
    tf_probabilities, tf_flags = Predictor(model_file, "tf").predict(images)
    np.testing.assert_allclose(onnx_probabilities, tf_probabilities, atol=1e-5)
    assert (onnx_probabilities.argmax(1) == tf_probabilities.argmax(1)).all()
    assert (onnx_flags == tf_flags).all() and onnx_flags[len(sevens) :].mean() > 0.5


def test_the_export_check_refuses_a_graph_whose_gate_is_another(model_file):
    """The check holds the graph to Keras and its trees to scikit-learn's on the same features: a
    gate fitted otherwise (digits and non-digits swapped) is refused."""
    import keras

    from pipeline.core.graph import convert
    from pipeline.core.trust import gate, nondigits
    from tests.conftest import varied_sevens

    sevens = np.stack([normalize.to_mnist(image) for image in varied_sevens(50, seed=7)])
    others = gate.to_mnist_forms([i for group in nondigits.generate(20, 3, sevens).values() for i in group])
    sevens = sevens[..., None]
    model = keras.models.load_model(model_file, compile=False)
    features = gate.with_features(model)
    other_features = features.predict(others, verbose=0)[1]
    swapped = gate.Gate().fit(other_features, others, features.predict(sevens, verbose=0)[1], sevens)
    swapped.set_threshold(swapped.scores(other_features, others), 0.01)
    calibration = json.loads(model_file.with_name("cnn.calibration.json").read_text())
    images, graph = np.concatenate([sevens, others]), model_file.with_suffix(".onnx")
    own = gate.load(model_file.with_name("cnn.gate.pkl"))
    assert convert.check(graph, convert.serving_function(model, calibration, own), own, images)["same_not_a_digit"] == 1
    with pytest.raises(convert.ExportError, match="does not answer as Keras does"):
        convert.check(graph, convert.serving_function(model, calibration, swapped), swapped, images)


def test_serving_never_imports_tensorflow(model_file):
    """The CLI and the API on the default runtime: no TensorFlow, Keras or scikit-learn is loaded."""
    code = f"""
import sys
from fastapi.testclient import TestClient
from pipeline.cli import main
from pipeline.serving.api import create_app
from pipeline.serving.predictor import Predictor
from tests.helpers import draw_digit_seven
import io
draw_digit_seven().save("seven.png")
assert main(["predict", "seven.png", "--model", "{model_file}"]) == 0
with TestClient(create_app(Predictor("{model_file}"))) as client:
    assert client.post("/predict", files={{"file": open("seven.png", "rb")}}).status_code == 200
loaded = [m for m in ("tensorflow", "keras", "sklearn", "scipy.optimize") if m in sys.modules]
assert not loaded, loaded
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=model_file.parent,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_json_pixels_and_batch(client, predictor):
    pixels = normalize.to_mnist(draw_digit_seven())
    body = client.post("/predict", json={"pixels": pixels.tolist()}).json()
    assert body["digit"] == int(predictor.probabilities([pixels])[0].argmax())
    files = [("files", (f"{i}.png", png(draw_digit_seven(offset=(10 * i, 20))), "image/png")) for i in range(3)]
    batch = client.post("/predict/batch", files=files).json()["predictions"]
    assert [p["file"] for p in batch] == ["0.png", "1.png", "2.png"]
    assert all(len(p["probabilities"]) == 10 and p["not_sure"] for p in batch)


BAD_REQUESTS = {
    "not an image": dict(files={"file": ("notes.txt", b"hello, not an image", "text/plain")}),
    "empty upload": dict(files={"file": ("empty.png", b"", "image/png")}),
    "truncated png": dict(files={"file": ("cut.png", png(draw_digit_seven())[:300], "image/png")}),
    "blank image": dict(files={"file": ("blank.png", png(Image.new("L", (50, 50), 255)), "image/png")}),
    "too many bytes": dict(files={"file": ("big.bmp", b"BM" + b"\0" * (normalize.MAX_BYTES + 10), "image/bmp")}),
    "decompression bomb": dict(files={"file": ("bomb.png", png(Image.new("L", (8000, 6000), 255)), "image/png")}),
    "wrong form field": dict(files={"image": ("seven.png", png(draw_digit_seven()), "image/png")}),
    "empty body": dict(content=b"", headers={"content-type": "multipart/form-data; boundary=x"}),
    "no content type": dict(content=b"raw bytes"),
    "wrong content type": dict(content=b"<xml/>", headers={"content-type": "application/xml"}),
    "broken multipart": dict(content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"}),
    "invalid json": dict(content=b"{not json", headers={"content-type": "application/json"}),
    "json without pixels": dict(json={"image": [1, 2, 3]}),
    "json list body": dict(json=[[0] * 28] * 28),
    "wrong array shape": dict(json={"pixels": [[0.0] * 27] * 28}),
    "ragged array": dict(json={"pixels": [[0.0] * 28, [0.0] * 3]}),
    "non-numeric pixels": dict(json={"pixels": [["a"] * 28] * 28}),
    "boolean pixels": dict(json={"pixels": [[True] * 28] * 28}),
    "out of range pixels": dict(json={"pixels": [[300.0] * 28] * 28}),
    "json body over the limit": dict(
        content=b'{"pixels": [' + b"0.0, " * 400_000 + b"0.0]}", headers={"content-type": "application/json"}
    ),
    "deeply nested json": dict(
        content=b'{"pixels": ' + b"[" * 5000 + b"]" * 5000 + b"}", headers={"content-type": "application/json"}
    ),
}


def test_a_huge_image_in_a_small_file_gets_413(client):
    """20000x20000 1-bit pixels compress to a few dozen KB; PIL refuses them while opening."""
    bomb = png(Image.new("1", (20000, 20000), 1))
    assert len(bomb) < normalize.MAX_BYTES
    response = client.post("/predict", files={"file": ("bomb.png", bomb, "image/png")})
    assert response.status_code == 413 and "bomb.png" in response.json()["detail"]


def test_a_json_body_over_the_limit_gets_413(client):
    response = client.post("/predict", **BAD_REQUESTS["json body over the limit"])
    assert response.status_code == 413 and "byte limit" in response.json()["detail"]


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_with_a_message_and_the_server_stays_up(client, case):
    response = client.post("/predict", **BAD_REQUESTS[case])
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
    assert response.json()["detail"]
    assert client.get("/health").status_code == 200


def test_batch_with_one_bad_file_names_it(client):
    files = [
        ("files", ("good.png", png(draw_digit_seven()), "image/png")),
        ("files", ("bad.png", b"nope", "image/png")),
    ]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 422 and "bad.png" in response.json()["detail"]


def test_liveness_readiness_and_metrics(client, predictor):
    assert client.get("/health/live").json() == {"status": "ok"}
    assert client.get("/health/ready").json() == {"status": "ready", "model": predictor.identity}
    client.post("/predict", json={"pixels": normalize.to_mnist(draw_digit_seven()).tolist()})
    client.post("/predict", **BAD_REQUESTS["invalid json"])
    metrics = client.get("/metrics").text
    assert 'http_requests_total{handler="/predict",method="POST",status="2xx"}' in metrics
    assert 'http_requests_total{handler="/predict",method="POST",status="4xx"}' in metrics
    assert 'http_request_duration_seconds_bucket{handler="/predict"' in metrics
    assert "digits_model_batch_size_bucket" in metrics and "digits_model_batch_seconds_count" in metrics
    assert f'digits_model_info{{model="{predictor.identity}"' in metrics


def chunks(total, size=1024 * 1024):
    """A request body streamed in chunks, with no content-length: the server cannot know its size."""
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


@pytest.mark.parametrize("route", ["/predict", "/predict/batch", "/health"])
def test_every_route_refuses_a_body_over_its_limit_with_413(client, route):
    limit = limits.BODY_LIMITS.get(route, limits.OTHER_ROUTES_BODY_LIMIT)
    headers = {"content-type": "multipart/form-data; boundary=x"}
    declared = client.post(route, content=b"x" * (limit + 1), headers=headers)
    assert declared.status_code == 413 and "limit" in declared.json()["detail"]
    if route != "/health":  # a GET route never reads its body, so a stream without a length ends unread
        streamed = client.post(route, content=chunks(limit + 1), headers=headers)
        assert streamed.status_code == 413 and "limit" in streamed.json()["detail"]


def test_concurrent_requests_share_one_model_call():
    calls = []

    def predict(batch):
        calls.append(len(batch))
        return batch.reshape(len(batch), -1)[:, :10] + 1, np.arange(len(batch))

    async def main():
        batcher = batching.MicroBatcher(predict)
        runner = asyncio.create_task(batcher.run())
        requests = [np.full((n, 28, 28), n, np.float32) for n in (1, 3, 1, 2)]
        answers = await asyncio.gather(*(batcher(images) for images in requests))
        runner.cancel()
        return requests, answers

    requests, answers = asyncio.run(main())
    assert calls == [7]  # one call for all four requests
    for images, (rows, _) in zip(requests, answers, strict=True):
        assert rows.shape == (len(images), 10) and (rows == len(images) + 1).all()
    # Each request gets its own rows of every output, in order.
    assert [list(indices) for _, indices in answers] == [[0], [1, 2, 3], [4], [5, 6]]


def test_a_failing_model_call_fails_its_requests_and_the_next_call_still_runs():
    outcomes = iter([RuntimeError("model broke"), None])

    def predict(batch):
        error = next(outcomes)
        if error:
            raise error
        return (np.zeros((len(batch), 10)),)

    async def main():
        batcher = batching.MicroBatcher(predict)
        runner = asyncio.create_task(batcher.run())
        first = await asyncio.gather(
            batcher(np.zeros((1, 28, 28))), batcher(np.zeros((1, 28, 28))), return_exceptions=True
        )
        second = await batcher(np.zeros((2, 28, 28)))
        runner.cancel()
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) for e in first) and second[0].shape == (2, 10)


def test_schemathesis_finds_no_failure_in_the_live_api(predictor, tmp_path):
    """Every schemathesis check against the running server: no 5xx, statuses and bodies as the
    OpenAPI document says, schema-violating requests refused, schema-valid ones accepted."""
    from pipeline.serving.feedback import Feedback

    kept = Feedback(tmp_path / "feedback", predictor.identity, per_minute=10**6)  # /feedback is fuzzed too
    url, server = serve_in_background(predictor, kept=kept)
    try:
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "st"),
                "--config-file",
                str(ROOT / "tests/schemathesis.toml"),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                "40",
                "--seed",
                "1",
                "--workers",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )  # its cache folder goes there
    finally:
        server.should_exit = True
    assert done.returncode == 0, done.stdout[-12000:]
    assert "passed" in done.stdout and "failed" not in done.stdout.split("SUMMARY")[-1]
