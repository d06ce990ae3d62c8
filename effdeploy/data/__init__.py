"""Images in, model inputs out: datasets, the model-owned preprocessing, calibration sets."""
