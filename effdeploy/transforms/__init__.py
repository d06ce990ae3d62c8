"""Transforms of a trained model that quantization and the CLI both apply: SE reordering (weight
transplant, then distillation from the original). Built on ``data`` and ``model`` only, so
``quant`` can reorder a checkpoint without importing ``train``."""
