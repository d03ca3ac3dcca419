"""Running the API with uvicorn: one process with the model loaded here, or N worker processes that
each load their own copy (`digits serve --workers N`)."""

import os
import shutil
import tempfile

from pipeline.serving import feedback
from pipeline.serving.predictor import check_source, threads_from_environment
from pipeline.serving.reader import check_reader

GRACEFUL_SECONDS = 30  # on SIGTERM or Ctrl-C, requests in flight get this long to be answered


def where(host, port):
    return f"http://{host}:{port}/ (API docs at /docs, metrics at /metrics)"


def run(predictor, number_reader, host, port, kept=None):
    """Serve one loaded model (and reader of numbers, and feedback.Feedback if any) in this process
    until stopped."""
    import uvicorn

    from pipeline.serving.api import create_app

    print(
        f"digits: serving {predictor.source} ({predictor.identity}), numbers read by {number_reader.source}, "
        f"on {where(host, port)}",
        flush=True,
    )
    uvicorn.run(
        create_app(predictor, number_reader, kept),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
    )


def run_workers(model, runtime, reader, host, port, workers, kept=(None, 0, 0)):
    """Serve with `workers` processes, each loading `model` and `reader` itself, and keeping
    feedback as `kept` (folder or None, per minute, quota) says (api.app_from_environment). Their
    metrics are summed through files in a fresh folder (prometheus_client's multiprocess mode). Bad
    input raises FileNotFoundError or ValueError before any worker starts."""
    import uvicorn

    check_source(model)
    check_reader(reader)
    threads_from_environment()  # a bad DIGITS_THREADS is named here, not in every worker
    feedback.to_environment(*kept)
    os.environ["DIGITS_MODEL"], os.environ["DIGITS_RUNTIME"], os.environ["DIGITS_READER"] = model, runtime, reader
    # Each worker's model gets its share of the cores: N workers with every core each would
    # oversubscribe them.
    os.environ.setdefault("DIGITS_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    metrics = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="digits-metrics-")
    print(f"digits: serving {model} with {workers} worker processes on {where(host, port)}", flush=True)
    try:
        uvicorn.run(
            "pipeline.serving.api:app_from_environment",
            factory=True,
            workers=workers,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=GRACEFUL_SECONDS,
        )
    finally:  # the workers' metric files are this run's alone: a later run starts from zero
        shutil.rmtree(metrics, ignore_errors=True)
