"""Artifacts: ONNX and TFLite files of a model, proven faithful, described by a manifest."""
