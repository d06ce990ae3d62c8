"""Training from scratch (SE reordering, which distils a trained model, lives in ``effdeploy.transforms``)."""
