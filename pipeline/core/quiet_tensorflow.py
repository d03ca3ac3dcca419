"""Holds back TensorFlow's start-up noise for every entry point: pages of C++ logs (oneDNN notices,
CPU feature flags) before anything useful, and its Python warnings. Imported by pipeline/__init__.py,
so any import of the package installs it before TensorFlow loads; TF_CPP_MIN_LOG_LEVEL set by the
user still wins."""

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import tempfile

# TensorFlow prints pages of C++ start-up logs (oneDNN notices, CPU feature flags) before
# anything useful; silence them for every entry point unless the user asked for them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Holds back what TensorFlow writes to stderr while it loads. Since TF 2.16 a few notices
    ("All log messages before absl::InitializeLog() ...", "oneDNN custom operations are on")
    come from absl before TF_CPP_MIN_LOG_LEVEL applies. They are shown if the import fails."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one import only, and let the normal finders locate it
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_resource_reader, is_package, ... stay the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        sys.stderr.flush()
        saved_stderr = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                self.loader.exec_module(module)
            except BaseException:
                os.dup2(saved_stderr, 2)
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))
                raise
            finally:
                os.dup2(saved_stderr, 2)
                os.close(saved_stderr)


if os.environ["TF_CPP_MIN_LOG_LEVEL"] >= "2":
    # e.g. "5 out of the last 5 calls ... triggered tf.function retracing", which Keras' predict
    # causes when it is given arrays of several lengths: harmless, and nothing a user can act on.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _QuietTensorFlowImport())
