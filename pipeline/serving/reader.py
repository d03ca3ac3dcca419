"""The reader of whole numbers that `digits read`, `POST /read`, the page's number mode and
`digits score --read` use: the line reader's ONNX graph (models/reader.onnx: no cutting, a
calibrated whole-number confidence from its verifier, a mark that is no digit read as "?"), with the
digit model looking at each digit's ink; or, with `--reader segment`, the digit model alone on the
ink cut into digits (the older way, kept for comparison)."""

from pathlib import Path

from pipeline.core.reading import segment, sequence

DEFAULT_READER = "models/reader.onnx"
SEGMENT = "segment"


def served_reader(source):
    """The reader `digits serve` uses: `source`, except that a missing default line reader (not yet
    exported) leaves numbers to the segmenter, saying so, so that the server still answers digits."""
    import sys

    if source == DEFAULT_READER and not Path(source).exists():
        print(
            f"digits: {source} not found (`dvc repro export`): numbers are read by cutting them (segment)",
            file=sys.stderr,
        )
        return SEGMENT
    return source


def check_reader(source):
    """FileNotFoundError, before any model loads, when `source` is neither "segment" nor a file."""
    if str(source) != SEGMENT and not Path(source).exists():
        raise FileNotFoundError(
            f"{source}: no such line reader (run `dvc repro export`, or `dvc pull`; or use --reader segment)"
        )


class NumberReader:
    def __init__(self, source, predictor, threads=None):
        """`source`: the line reader's .onnx file, or "segment". `predictor`: the digit model."""
        from pipeline.core.graph.runtime import ReaderGraph

        self.source, self.predictor = str(source), predictor
        check_reader(self.source)
        self.graph = None if self.source == SEGMENT else ReaderGraph(self.source, threads)

    @property
    def identity(self):
        return SEGMENT if self.graph is None else "sha256:" + self.graph.model_sha256[:16]

    def read(self, image):
        """A PIL image or array of one number -> segment.Reading; normalize.ImageError if unreadable."""
        if self.graph is None:
            return segment.read(image, self.predictor)
        return sequence.read(image, self.graph, self.predictor)
