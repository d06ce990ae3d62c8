"""Post-training quantization: BN folding, fake-quant simulation (the reference every runtime
artifact must reproduce), calibration observers, rounding optimisation and emitters."""
