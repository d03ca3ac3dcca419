"""The served graph: a model, its calibration and its gate converted to one ONNX graph (convert),
and that graph answering on ONNX Runtime without TensorFlow (runtime)."""
