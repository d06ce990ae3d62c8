"""Mixed precision by measurement on a tiny checkpoint: budget strings, the budget kept, tighter
budgets never choosing larger models, sizes against a count from layer shapes, the in-place
re-quantization against simulations built afresh, and the overlay loading back as a config."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import colour_folder

from effdeploy.config import LayerOverride, QuantConfig, RunConfig, load_run_config, load_yaml, parse
from effdeploy.data.sources import load_images
from effdeploy.errors import EffdeployError
from effdeploy.metrics import snr_db
from effdeploy.model.checkpoints import load_checkpoint, save_checkpoint
from effdeploy.model.efficientnet import build_model
from effdeploy.quant.mixed_precision import (
    Budget,
    Chain,
    LayerWidths,
    Point,
    choose,
    layer_pattern,
    search,
    wider_than,
    write_overlay,
)
from effdeploy.quant.pipeline import _batches, methods_for, run_method, weight_bytes
from effdeploy.quant.sim import QuantSim

CIFAR_PRE = {
    "resize": "resize",
    "interpolation": "bilinear",
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.2470, 0.2435, 0.2616],
}
PINNED = "stem.conv"  # the config's own override keeps it at 8 bits


@pytest.fixture(scope="module")
def run(tmp_path_factory, repo_root: Path) -> RunConfig:
    """A tiny b0 whose BN statistics are those of real images, so that its logits depend on the
    input (at its initialisation they vanish, and every width would measure the same)."""
    tmp = tmp_path_factory.mktemp("mp")
    torch.manual_seed(0)
    model = build_model(
        {
            "variant": "b0",
            "width_mult": 0.25,
            "depth_mult": 0.25,
            "resolution": 32,
            "num_classes": 3,
            "preprocess": CIFAR_PRE,
        }
    )
    cal_file = repo_root / "calibration/cifar10_train_512_seed0.safetensors"
    pre = model.config.preprocess
    x = torch.from_numpy(load_images(cal_file, pre, n=96, seed=1).inputs(pre))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # the plain average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)
    ckpt = save_checkpoint(model.eval(), tmp / "tiny.safetensors")
    data = colour_folder(tmp / "data", per_class=8)
    return parse(
        RunConfig,
        {
            "name": "tiny",
            "checkpoint": str(ckpt),
            "model": json.loads(model.config.model_dump_json()),
            "data": {"train": str(data), "test": str(data), "val_fraction": 0.25},
            "quant": {
                "calibration": str(cal_file),
                "calibration_images": 32,
                "snr_images": 24,
                "overrides": [{"pattern": "^stem\\.", "weight_bits": 8}],
            },
        },
        "test",
    )


@pytest.fixture(scope="module")
def result(run: RunConfig):
    return search(run, Budget.parse("bits=6"), log=lambda m: None)


def _shapes(run: RunConfig) -> dict[str, tuple[int, ...]]:
    """Every conv / linear weight's shape, read from the checkpoint's own modules."""
    model = load_checkpoint(run.checkpoint)
    return {
        n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    }


def _hand_size(shapes: dict[str, tuple[int, ...]], bits: dict[str, int]) -> int:
    """Weights at their widths, plus a 4-byte bias and a 4-byte scale per output channel."""
    eighths = sum(math.prod(s) * bits[n] for n, s in shapes.items())  # in bits
    return eighths // 8 + sum(8 * s[0] for s in shapes.values())


def _cal_batches(run: RunConfig):
    pre = run.model.preprocess
    return _batches(load_images(run.quant.calibration, pre, n=run.quant.calibration_images).inputs(pre), 64)


# ------------------------------------------------------------------------------- budget strings
@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("size=0.6MB", "size", 600_000),
        ("size=600KB", "size", 600_000),
        ("size=600kb", "size", 600_000),
        ("size=600KiB", "size", 614_400),
        ("size=1.5MiB", "size", 1_572_864),
        ("size=614400", "size", 614_400),
        ("size=2e5B", "size", 200_000),
        (" bits = 5.5 ", "bits", 5.5),
        ("BITS=4", "bits", 4.0),
    ],
)
def test_budget_parse(text: str, kind: str, value: float) -> None:
    b = Budget.parse(text)
    assert (b.kind, b.value) == (kind, value)


@pytest.mark.parametrize(
    "text",
    ["", "size", "size=", "size=MB", "size=-1MB", "size=0KB", "size=1TB", "size=1.2.3MB", "size=nanMB",
     "bits=", "bits=abc", "bits=0", "bits=-2", "bits=inf", "bits=nan", "bits=40", "speed=3", "6"],
)  # fmt: skip
def test_budget_parse_refuses(text: str) -> None:
    with pytest.raises(EffdeployError, match=r"^--budget: ") as err:
        Budget.parse(text)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------- the search
def test_budget_respected_and_curve(run: RunConfig, result) -> None:
    c = result.chosen
    assert c.mean_bits <= 6 and c in result.curve
    shapes = _shapes(run)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    assert c.mean_bits == pytest.approx(sum(numel[n] * c.bits[n] for n in numel) / sum(numel.values()))
    # the config's own override is kept and its layer not searched
    assert PINNED not in result.sensitivity and all(p.bits[PINNED] == 8 for p in result.curve)
    assert result.pinned == {PINNED: 8}
    assert set(result.sensitivity) == set(shapes) - {PINNED}
    for scores in result.sensitivity.values():
        assert [s.bits for s in scores] == [8, 6, 4]
    # from all at 8 bits to all at 4, every step smaller; each layer lowered at most twice
    assert set(result.curve[0].bits.values()) == {8}
    assert {b for n, b in result.curve[-1].bits.items() if n != PINNED} == {4}
    sizes = [p.size_bytes for p in result.curve]
    assert all(a > b for a, b in zip(sizes, sizes[1:], strict=False))
    assert len(shapes) - 1 <= len(result.curve) - 1 <= 2 * (len(shapes) - 1)
    # the top-1 column: the 24 labelled images of the data folder, a multiple of 1/24
    assert result.eval_images == 24
    assert all(p.top1 is not None and round(24 * p.top1, 6).is_integer() for p in result.curve)


def test_tighter_budget_never_larger(result) -> None:
    curve = result.curve
    lo, hi = curve[-1].size_bytes, curve[0].size_bytes
    budgets = [Budget.parse(f"size={int(lo + f * (hi - lo))}") for f in (1.0, 0.8, 0.6, 0.45, 0.3, 0.15, 0.05, 0.0)]
    chosen = [choose(curve, b) for b in budgets]
    for b, p in zip(budgets, chosen, strict=True):
        assert p.size_bytes <= b.value
    sizes = [p.size_bytes for p in chosen]
    assert sizes == sorted(sizes, reverse=True)
    assert chosen[0].snr_db == max(p.snr_db for p in curve)  # the loosest budget: the best point
    # mean-bit budgets as well
    bit_budgets = [Budget.parse(f"bits={b}") for b in (8, 7, 6.5, 6, 5.5, 5, 4.5, 4.02)]
    sizes = [choose(curve, b).size_bytes for b in bit_budgets]
    assert sizes == sorted(sizes, reverse=True)
    assert all(choose(curve, b).mean_bits <= b.value for b in bit_budgets)


def test_full_search_agrees_with_the_curve(run: RunConfig, result) -> None:
    """A second, tighter search measures the same curve and chooses no larger a model."""
    tight = Budget.parse(f"size={result.chosen.size_bytes - 2000}")
    again = search(run, tight, log=lambda m: None)
    assert [(p.bits, p.snr_db) for p in again.curve] == [(p.bits, p.snr_db) for p in result.curve]
    assert again.chosen.size_bytes <= tight.value < result.chosen.size_bytes


def test_unreachable_budget(run: RunConfig) -> None:
    """Every searched layer at 4 bits (the stem at 8) is the floor; one byte less cannot be met,
    and is refused before anything is measured."""
    shapes = _shapes(run)
    floor = _hand_size(shapes, {n: 8 if n == PINNED else 4 for n in shapes})
    lines: list[str] = []
    with pytest.raises(EffdeployError, match=r"^--budget: size=\d+ cannot be met") as err:
        search(run, Budget.parse(f"size={floor - 1}"), log=lines.append)
    assert f"{floor:,} bytes" in str(err.value)
    assert not any("sensitivity" in line for line in lines)
    with pytest.raises(EffdeployError, match=r"^--budget: bits=3.9 cannot be met"):
        search(run, Budget.parse("bits=3.9"), log=lines.append)


def test_size_by_hand(run: RunConfig, result) -> None:
    shapes = _shapes(run)
    for p in (result.chosen, result.curve[0], result.curve[-1]):
        assert p.size_bytes == _hand_size(shapes, p.bits)
    # all at 8 bits: one byte per weight
    assert result.curve[0].size_bytes == sum(math.prod(s) + 8 * s[0] for s in shapes.values())


def test_sensitivity_matches_a_fresh_simulation(run: RunConfig, result) -> None:
    """One layer lowered in place measures what a simulation built with that layer's override,
    calibrated afresh, measures."""
    model = load_checkpoint(run.checkpoint).eval()
    batches = _cal_batches(run)
    method = dataclasses.replace(methods_for(run, "w8a8")[1], passes=())
    for name in ("blocks.block2a.expand.conv", "classifier"):
        lowered = LayerOverride(pattern=layer_pattern(name), weight_bits=4)
        quant = run.quant.model_copy(update={"overrides": (*run.quant.overrides, lowered)})
        sim, _ = run_method(model, quant, method, "w8a8", batches)
        with sim.running(quantized=False):
            ref = torch.cat([sim(x) for x in batches]).numpy()
        out = torch.cat([sim(x) for x in batches]).numpy()
        four = [s for s in result.sensitivity[name] if s.bits == 4][0]
        assert snr_db(ref, out) == pytest.approx(four.snr_db, abs=1e-6)


@pytest.mark.parametrize("fraction", [1.0, 0.3, 0.0])
def test_chain_runs_only_what_changed(run: RunConfig, fraction: float) -> None:
    """Re-running from a changed layer's link (all, some or none of the links' inputs kept)
    gives the whole network's logits, change after change."""
    model = load_checkpoint(run.checkpoint).eval()
    batches = _cal_batches(run)
    batches = [batches[0][:20], batches[0][20:]]  # two batches: each keeps its own inputs
    sim, _ = run_method(model, run.quant, dataclasses.replace(methods_for(run, "w8a8")[1], passes=()), "w8a8", batches)
    links = len(Chain(sim, batches, max_bytes=0).fns)
    every_input = sum(t.nbytes for k, v in Chain(sim, batches).kept.items() if k > 0 for t in v)
    chain = Chain(sim, batches, max_bytes=int(fraction * every_input))
    kept = len(chain.kept)  # link 0's input, the images, always
    assert kept == links if fraction == 1 else kept == 1 if fraction == 0 else 1 < kept < links
    widths = LayerWidths(sim, "auto")
    for name, bits in [("blocks.block5a.expand.conv", 4), ("classifier", 6), ("blocks.block2a.dwconv.conv", 4)]:
        widths.set(name, bits)
        got = chain.logits(name, keep=True)
        assert torch.equal(got, torch.cat([sim(x) for x in batches]))


# ------------------------------------------------------------------------------- the overlay
def test_overlay_loads_back(run: RunConfig, result, tmp_path: Path) -> None:
    path = write_overlay(result, tmp_path / "mixed.yaml")
    data = load_yaml(path)
    assert set(data) == {"quant"} and set(data["quant"]) == {"overrides"}
    q = parse(QuantConfig, data["quant"], str(path))
    assert q.overrides[0].pattern == "^stem\\." and q.overrides[0].weight_bits == 8  # the config's own first
    patterns = [o.pattern for o in q.overrides[1:]]
    assert patterns == [layer_pattern(n) for n in result.sensitivity]
    model = load_checkpoint(run.checkpoint).eval()
    sim = QuantSim(model, weight_bits=8, act_bits=8, weight_overrides=[(o.pattern, o.weight_bits) for o in q.overrides])
    assert {n: w.bits for n, w in sim.weights.items()} == result.chosen.bits
    assert all(p.bits == 8 for p in sim.points.values())  # activations untouched
    # the same widths at any precision's weight bits (every searched layer is listed)
    sim4 = QuantSim(
        model, weight_bits=4, act_bits=8, weight_overrides=[(o.pattern, o.weight_bits) for o in q.overrides]
    )
    assert {n: w.bits for n, w in sim4.weights.items()} == result.chosen.bits
    assert weight_bytes(sim) == result.chosen.size_bytes


def test_overlay_on_a_config_quantizes_as_measured(run: RunConfig, result, tmp_path: Path) -> None:
    """``base=``: the run config with the list in place; the simulation built from it (as
    ``effdeploy quantize`` builds it, passes aside) measures the chosen point's SNR."""
    base = tmp_path / "run.yaml"
    base.write_text(yaml.safe_dump(json.loads(run.model_dump_json())))
    path = write_overlay(result, tmp_path / "mixed_run.yaml", base=base)
    loaded = load_run_config(path)
    assert loaded.checkpoint == run.checkpoint and loaded.quant.calibration_images == 32
    assert [o.model_dump() for o in loaded.quant.overrides] == [
        parse(QuantConfig, {"overrides": [o]}, "t").overrides[0].model_dump() for o in result.overrides
    ]
    batches = _cal_batches(run)
    method = dataclasses.replace(methods_for(loaded, "w8a8")[1], passes=())
    model = load_checkpoint(run.checkpoint).eval()
    sim, _ = run_method(model, loaded.quant, method, "w8a8", batches)
    assert {n: w.bits for n, w in sim.weights.items()} == result.chosen.bits
    with sim.running(quantized=False):
        ref = torch.cat([sim(x) for x in batches]).numpy()
    out = torch.cat([sim(x) for x in batches]).numpy()
    assert snr_db(ref, out) == pytest.approx(result.chosen.snr_db, abs=1e-6)


def test_table_rows(result) -> None:
    cols, rows = result.table()
    assert len(cols) == len(rows[0]) and all(len(r) == len(cols) for r in rows)
    marked = [r for r in rows if r[-1] == "*"]
    assert len(marked) == 1 and marked[0][0] == str(result.chosen.step)
    assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)
    assert len(rows) == len([p for p in result.curve if p.pareto or p is result.chosen])


def test_precision_must_match_candidates(run: RunConfig) -> None:
    with pytest.raises(EffdeployError, match=r"^--precision: w4a8"):
        search(run, Budget.parse("bits=6"), precision="w4a8", log=lambda m: None)
    with pytest.raises(EffdeployError, match=r"^--candidates: "):
        search(run, Budget.parse("bits=6"), candidates=(8, 1), log=lambda m: None)


def test_wider_than_puts_each_layer_at_its_width_on_a_narrower_base() -> None:
    from effdeploy.quant.sim import resolve_bits

    bits = {"stem.conv": 8, "blocks.block1a.dw.conv": 4, "blocks.block2a.expand.conv": 6, "classifier": 8}
    point = Point(3, "x", bits, 0, 0.0, 0.0, 0.0)
    overrides = wider_than(point, base_bits=4)
    assert overrides == [
        {"pattern": r"^(classifier|stem\.conv)$", "weight_bits": 8},
        {"pattern": r"^(blocks\.block2a\.expand\.conv)$", "weight_bits": 6},
    ]
    rules = [(o["pattern"], o["weight_bits"]) for o in overrides]
    assert {n: resolve_bits(n, 4, rules) for n in bits} == bits
    assert resolve_bits("blocks.block2a.expand.conv2", 4, rules) == 4  # anchored: no prefix match
