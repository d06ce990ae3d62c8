"""Shared fixtures: a tiny model config for fast forward/backward tests and the repo / data paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
IMAGENET_SAMPLES = SHARED_DATA / "imagenet-samples"

# Small enough that a forward + backward pass takes milliseconds on a CPU, but still has every
# kind of block: expand == 1 (block1a), strided blocks, and residual blocks (block4b, block5b, ...).
TINY_CONFIG: dict = {
    "variant": "b0",
    "width_mult": 0.25,
    "depth_mult": 0.5,
    "resolution": 32,
    "num_classes": 10,
}


@pytest.fixture
def tiny_config() -> dict:
    """Fields of a tiny ModelConfig (a fresh copy per test, safe to update)."""
    return dict(TINY_CONFIG)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def imagenet_samples() -> Path:
    return IMAGENET_SAMPLES


def pytest_configure(config: pytest.Config) -> None:
    # The test models are tiny: intra-op threading buys nothing and, when another process is busy
    # on the same cores, OpenMP spin-waiting makes a 10 ms forward/backward take seconds.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, so random weights and inputs are reproducible."""
    torch.manual_seed(0)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every float parameter and buffer with fresh random values (BN statistics included),
    so that weight-copying tests cannot pass by accident on default initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("norm.weight",)):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


@pytest.fixture
def randomize():
    """The `randomize_` helper, as a fixture."""
    return randomize_


def colour_folder(root: Path, classes: int = 3, per_class: int = 12, seed: int = 0) -> Path:
    """An ImageFolder of 32x32 PNGs, one folder per class, each class with a dominant colour
    (random pixels, one channel at 255): separable, so a model can tell them apart."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            img[..., c] = 255
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `effdeploy ARGS` in a subprocess, as a user would (wide, plain terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "effdeploy.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    """A user error: status 2, exactly one stderr line 'effdeploy: error: ...', no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("effdeploy: error:")
    assert "Traceback" not in proc.stderr
    return lines[0]
