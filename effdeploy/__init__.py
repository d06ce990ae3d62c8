"""effdeploy: EfficientNet from PyTorch to the hardware it runs on, with measured quantization loss."""

__version__ = "0.1.0"
