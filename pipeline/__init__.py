"""MNIST digit recognition as a DVC pipeline. The stages are the modules here, one each (dvc.yaml
is the map); the shared core is in core/, serving in serving/, scale-out on Ray in scale/, and
`digits` (cli.py) is the command line of serving and scale-out."""

from pipeline.core import quiet_tensorflow  # noqa: F401  (must run before anything imports TensorFlow)
