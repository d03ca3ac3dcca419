"""`digits serve` as a user runs it: its own process, two workers, stopped with SIGTERM."""

import re
import signal
import socket
import time

import httpx
import pytest

from tests.helpers import draw_digit_seven, serve_in_subprocess

WORKERS = 2


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The server's temporary folder (TMPDIR), where its workers' metric files go."""
    return tmp_path_factory.mktemp("serve-tmp")


@pytest.fixture(scope="module")
def server(model_file, scratch):
    process, url = serve_in_subprocess(model_file, workers=WORKERS, env={"TMPDIR": str(scratch)})
    yield url, process, int(url.rsplit(":", 1)[1])
    process.kill()
    process.wait()


def seven_png():
    import io

    out = io.BytesIO()
    draw_digit_seven().save(out, format="PNG")
    return out.getvalue()


def test_workers_answer_and_metrics_add_up_across_them(server, scratch):
    url, _, _ = server
    with httpx.Client(base_url=url) as client:
        statuses = [
            client.post("/predict", files={"file": ("seven.png", seven_png(), "image/png")}).status_code
            for _ in range(20)
        ]
        metrics = client.get("/metrics").text
    assert statuses == [200] * 20
    counted = re.search(r'http_requests_total\{handler="/predict",method="POST",status="2xx"\} (\S+)', metrics)
    assert counted and float(counted[1]) == 20  # summed over both worker processes
    assert "digits_model_info{" in metrics and "digits_model_batch_size_count" in metrics
    assert list(scratch.glob("digits-metrics-*/*.db"))  # the workers' metric files, while it serves


def test_sigterm_answers_the_request_in_flight_then_exits(server, scratch):
    url, process, port = server
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="seven.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + seven_png() + b"\r\n--b--\r\n"
    )
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body[:100]
        )
        time.sleep(0.5)  # the server has the request's headers: it is in flight
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        connection.sendall(body[100:])
        response = b""
        while chunk := connection.recv(65536):  # the server closes the connection after answering
            response += chunk
    response = response.decode()
    assert response.startswith("HTTP/1.1 200"), response
    assert '"digit"' in response
    assert process.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health/live", timeout=2)
    assert not list(scratch.glob("digits-metrics-*"))  # its metric files went with it
