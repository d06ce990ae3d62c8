"""`effdeploy compare` end to end on synthetic cells: planted accuracies, a reordered twin with
planted discordant images, a skipped model, a skipped runtime, a bench report; reruns byte for byte."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from effdeploy.errors import EffdeployError
from effdeploy.study.compare import compare_run, load_compare_config

N = 2000
LABELS = np.random.default_rng(123).integers(0, 10, N)
# float top-1 per model; quantized = float minus the drop for its placement and precision
FLOAT = {
    "after_s0": 0.800,
    "after_s1": 0.805,
    "after_s2": 0.795,
    "after_s3": 0.801,  # not trained yet when the study starts
    "before_s0": 0.802,
    "before_s1": 0.796,
    "before_s2": 0.799,
    "none_s0": 0.790,
    "none_s1": 0.785,
    "none_s2": 0.795,
    "d2_after_s0": 0.810,
    "d2_before_s0": 0.808,
}
DROP = {  # (placement, precision, method) -> top-1 lost to quantization
    ("after", "w8a8", "ours"): 0.002,
    ("before", "w8a8", "ours"): 0.002,
    ("none", "w8a8", "ours"): 0.003,
    ("after", "w4a8", "ours"): 0.010,
    ("before", "w4a8", "ours"): 0.090,
    ("none", "w4a8", "ours"): 0.020,
}
PLACEMENT = {name: name.split("_")[-2] for name in FLOAT}
TWIN_LOSES, TWIN_GAINS = 3, 1  # the reordered twin of after_s0: images it gets wrong / right vs its origin


def _logits(correct: np.ndarray, rng) -> np.ndarray:
    wrong = (LABELS + 1 + rng.integers(0, 9, N)) % 10
    target = np.where(correct, LABELS, wrong)
    x = rng.normal(0, 1, (N, 10)).astype(np.float32)
    x[np.arange(N), target] += 6
    return x


def _degrade(logits: np.ndarray, drop: float, rng, noise: float) -> np.ndarray:
    """Quantized logits: float plus noise, with round(drop * N) right images made wrong."""
    q = logits + rng.normal(0, noise, logits.shape).astype(np.float32)
    right = np.flatnonzero(logits.argmax(1) == LABELS)
    flip = rng.choice(right, int(round(drop * N)), replace=False)
    q[flip, (LABELS[flip] + 1) % 10] += 20
    return q


def _arrays(name: str, precision: str) -> dict[str, np.ndarray]:
    """The synthetic outputs.npz of one model at one precision (deterministic in its name)."""
    origin = "after_s0" if name == "before_reorder_s0" else name
    rng = np.random.default_rng(sum(map(ord, origin)))
    correct = np.zeros(N, bool)
    correct[rng.choice(N, int(round(FLOAT[origin] * N)), replace=False)] = True
    f = _logits(correct, rng)
    placement = PLACEMENT[origin]
    prng = np.random.default_rng([sum(map(ord, origin)), int(precision[1]), int(precision[3])])
    ours = _degrade(f, DROP[placement, precision, "ours"], prng, 0.2)
    out = {
        "labels": LABELS.astype(np.int64),
        "float": f,
        f"{precision}.ours": ours,
        f"{precision}.minmax": _degrade(f, 2 * DROP[placement, precision, "ours"], prng, 0.4),
        f"{precision}.ours.onnx_qdq": _degrade(ours, 0.0005, prng, 0.01),
        f"{precision}.ours.tflite_int8": _degrade(ours, 0.001, prng, 0.01),
    }
    if name == "before_reorder_s0":  # same images as its origin, except a few planted ones
        for k, v in out.items():
            if k == "labels":
                continue
            ok = np.flatnonzero(v.argmax(1) == LABELS)
            bad = np.flatnonzero(v.argmax(1) != LABELS)
            v = v.copy()
            v[ok[:TWIN_LOSES], (LABELS[ok[:TWIN_LOSES]] + 1) % 10] += 50
            v[bad[:TWIN_GAINS], LABELS[bad[:TWIN_GAINS]]] += 50
            out[k] = v
    if name == "before_s2" and precision == "w4a8":
        del out[f"{precision}.ours.tflite_int8"]
    return out


def fake_quantize(run, out_dir: Path, log) -> None:
    """Stands in for quantize_run: writes outputs.npz and report.json as the pipeline does."""
    with open("calls.log", "a") as fh:
        fh.write(f"{run.name}/{run.quant.precisions[0]}\n")
    precision = run.quant.precisions[0]
    arrays = _arrays(run.name, precision)
    np.savez_compressed(out_dir / "outputs.npz", **arrays)
    origin = "after_s0" if run.name == "before_reorder_s0" else run.name
    placement = "before" if run.name == "before_reorder_s0" else PLACEMENT[run.name]  # the checkpoint's
    depth = 32 if origin.startswith("d2") else 16
    results = []
    for method in ("minmax", "ours"):
        base = {"after": 20.0, "before": 12.0, "none": 18.0}[placement] - (method == "minmax") * 3
        blocks = {f"blocks.block{i}": base - 0.3 * i for i in range(depth)}
        artifacts = {}
        if method == "ours":
            artifacts = {"onnx_qdq": {"runtime": "onnxruntime"}, "tflite_int8": {"runtime": "litert"}}
            if f"{precision}.ours.tflite_int8" not in arrays:
                artifacts["tflite_int8"] = {"runtime": "litert", "skipped": "LOGISTIC has no int4 kernel"}
        results.append(
            {"precision": precision, "method": {"name": method}, "block_snr_db": blocks, "artifacts": artifacts}
        )
    report = {
        "name": run.name,
        "se_placement": placement,
        "held_out": {"data": str(run.data.test), "images": N},
        "results": results,
    }
    (out_dir / "report.json").write_text(json.dumps(report))


def _calls() -> list[str]:
    p = Path("calls.log")
    return p.read_text().splitlines() if p.exists() else []


def _model_entry(name: str, **extra) -> dict:
    seed = int(name.rsplit("_s", 1)[1])
    entry = {"name": name, "placement": PLACEMENT.get(name, "after"), "seed": seed, "config": f"configs/{name}.yaml"}
    if name.startswith("d2"):
        entry["group"] = "b0d2w05"
    return {**entry, **extra}


def _build_study() -> None:
    """The study's working tree in the current directory."""
    Path("calibration").mkdir()
    Path("calibration/cal.safetensors").write_bytes(b"pixels")
    Path("data/test/cat").mkdir(parents=True)
    Path("data/test/cat/0.png").write_bytes(b"png")
    Path("configs").mkdir()
    names = [*FLOAT, "before_reorder_s0"]
    for name in names:
        placement = "before" if name == "before_reorder_s0" else PLACEMENT.get(name, "after")
        cfg = {
            "checkpoint": f"models/{name}/model.safetensors",
            "model": {
                "variant": "b0",
                "width_mult": 0.5,
                "resolution": 32,
                "num_classes": 10,
                "se_placement": placement,
            },
            "data": {"train": "data/train", "test": "data/test"},
            "quant": {"calibration": "calibration/cal.safetensors"},
        }
        Path(f"configs/{name}.yaml").write_text(yaml.safe_dump(cfg))
        if name != "after_s3":  # not trained yet
            Path(f"models/{name}").mkdir(parents=True)
            Path(f"models/{name}/model.safetensors").write_bytes(name.encode())
    models = [_model_entry(n) for n in FLOAT if not n.startswith("d2")]
    models.append(_model_entry("before_reorder_s0", placement="before", group="b0w05_reorder", twin_of="after_s0"))
    models += [_model_entry(n) for n in FLOAT if n.startswith("d2")]
    Path("bench").mkdir()
    bench = {
        "records": [
            {
                "artifact": "model_w8a8.onnx",
                "backend": "onnxruntime",
                "status": "ok",
                "latency_ms": {"median": 1.234},
                "size_mb": 0.56,
            }
        ]
    }
    Path("bench/bench.json").write_text(json.dumps(bench))
    models[0]["bench"] = "bench"
    compare = {
        "precisions": ["w8a8", "w4a8"],
        "models": models,
        "cache": "study",
        "out": "compare",
        "resamples": 4000,
    }
    Path("compare.yaml").write_text(yaml.safe_dump(compare, sort_keys=False))


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _build_study()
    return tmp_path


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One full compare of the synthetic study (shared: a run draws PNGs, seconds on a busy CPU)."""
    root = tmp_path_factory.mktemp("study")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        _build_study()
        doc = compare_run("compare.yaml", log=lambda m: None, cell_fn=fake_quantize)
    finally:
        os.chdir(cwd)
    return root, doc


@pytest.fixture
def in_compared(compared, monkeypatch):
    root, doc = compared
    monkeypatch.chdir(root)
    return doc


def _top1(logits) -> float:
    return float(np.mean(np.argmax(logits, 1) == LABELS))


def test_compare_end_to_end(in_compared):
    doc = in_compared
    assert len(_calls()) == 12 * 2  # 12 trained models x 2 precisions; after_s3 has no checkpoint
    files = {p.name for p in Path("compare").iterdir()}
    assert files == {"compare.md", "compare.json", "snr_per_block_b0w05.png", "snr_per_block_b0d2w05.png"}
    on_disk = json.loads(Path("compare/compare.json").read_text())
    assert on_disk["verdicts"] == doc["verdicts"]

    # top-1 of a cell recomputed from the synthetic logits, and its image interval's width
    m = doc["measures"]["after_s1"]["w4a8"]["simulation/ours"]
    expected = _top1(_arrays("after_s1", "w4a8")["w4a8.ours"])
    assert m["top1"]["estimate"] == expected == pytest.approx(0.805 - 0.010)
    half = 1.96 * math.sqrt(expected * (1 - expected) / N)
    assert (m["top1"]["high"] - m["top1"]["low"]) / 2 == pytest.approx(half, rel=0.1)
    assert m["vs_float"]["estimate"] == pytest.approx(-0.010)

    # spread across seeds: mean and sample SD of the three seeds
    spread = doc["placements"]["b0w05"]["w4a8"]["simulation/ours"]["after"]
    seeds = [_top1(_arrays(f"after_s{s}", "w4a8")["w4a8.ours"]) for s in range(3)]
    assert spread["top1"]["mean"] == pytest.approx(np.mean(seeds))
    assert spread["top1"]["sd"] == pytest.approx(np.std(seeds, ddof=1))
    assert spread["seeds"] == [0, 1, 2]

    # verdicts: W4A8 SE after beats SE before (8 points planted) beyond the noise; W8A8 level
    def mean_top1(placement, precision):
        return np.mean([_top1(_arrays(f"{placement}_s{s}", precision)[f"{precision}.ours"]) for s in range(3)])

    w4 = next(v for v in doc["verdicts"]["w4a8"] if v.startswith("b0w05, simulation, ours:"))
    gap = mean_top1("after", "w4a8") - mean_top1("before", "w4a8")
    assert gap == pytest.approx(0.08, abs=0.005)
    assert f"SE after wins over SE before by {100 * gap:+.2f} points (95% CI " in w4
    assert "over 3 + 3 seeds): beyond the noise" in w4
    w8 = next(v for v in doc["verdicts"]["w8a8"] if v.startswith("b0w05, simulation, ours:"))
    gap = mean_top1("after", "w8a8") - mean_top1("before", "w8a8")
    assert f"SE after leads SE before by {100 * gap:+.2f} points (95% CI " in w8
    assert w8.split("leads SE before")[1].split(";")[0].endswith("within the noise")
    pair = next(
        q for q in doc["differences"]["b0w05"]["w8a8"]["simulation/ours"] if (q["a"], q["b"]) == ("after", "before")
    )
    ci = pair["top1"]["ci"]
    assert ci["low"] < 0 < ci["high"]

    # one seed per placement: judged on the shared seed's images, said so
    d2 = next(v for v in doc["verdicts"]["w4a8"] if v.startswith("b0d2w05, simulation, ours:"))
    assert "one seed each" in d2 and "McNemar p = " in d2 and "beyond the noise" in d2

    # the reordered twin: planted discordant images, McNemar by hand: 2 * (1 + 4) / 16
    twin = next(t for t in doc["twins"] if t["precision"] == "w8a8" and t["variant"] == "simulation/ours")
    assert (twin["mcnemar"]["only_a"], twin["mcnemar"]["only_b"]) == (TWIN_GAINS, TWIN_LOSES)
    assert twin["mcnemar"]["p_exact"] == pytest.approx(0.625)
    assert twin["difference"]["estimate"] == pytest.approx((TWIN_GAINS - TWIN_LOSES) / N)
    line = next(v for v in doc["verdicts"]["w8a8"] if v.startswith("reordered twins"))
    assert "p = 0.625 on 4 discordant images" in line and line.endswith("within the noise")

    md = Path("compare/compare.md").read_text()
    assert "after_s3/w8a8: skipped: checkpoint not there yet: models/after_s3/model.safetensors" in md
    assert "before_s2/w4a8 litert/ours: litert skipped: LOGISTIC has no int4 kernel" in md
    assert "| after_s0 | w8a8 | onnxruntime (ours) | 1.234 | 0.56 |" in md
    assert "![per-block SNR](snr_per_block_b0w05.png)" in md
    cells = {c["label"]: c for c in doc["cells"]}
    assert cells["after_s0/w8a8"]["status"] == "measured"
    assert cells["after_s3/w4a8"]["status"] == "skipped"


def test_placement_difference_over_seeds_is_welchs_interval(in_compared):
    scipy_stats = pytest.importorskip("scipy.stats")
    pairs = in_compared["differences"]["b0w05"]["w4a8"]["simulation/ours"]
    pair = next(q for q in pairs if (q["a"], q["b"]) == ("after", "before"))
    seeds = {pl: [_top1(_arrays(f"{pl}_s{s}", "w4a8")["w4a8.ours"]) for s in range(3)] for pl in ("after", "before")}
    assert pair["top1"]["a"] == seeds["after"] and pair["top1"]["b"] == seeds["before"]
    welch = scipy_stats.ttest_ind(seeds["after"], seeds["before"], equal_var=False).confidence_interval(0.95)
    ci = pair["top1"]["ci"]
    assert (ci["low"], ci["high"]) == pytest.approx((welch.low, welch.high), rel=1e-6)


def test_rerun_uses_the_cache_and_regenerates_byte_for_byte(in_compared):
    first = {p.name: p.read_bytes() for p in Path("compare").iterdir()}
    calls = len(_calls())
    compare_run("compare.yaml", log=lambda m: None, cell_fn=fake_quantize)
    assert len(_calls()) == calls
    assert {p.name: p.read_bytes() for p in Path("compare").iterdir()} == first


def test_a_new_checkpoint_adds_only_its_cells(compared, tmp_path, monkeypatch):
    shutil.copytree(compared[0], tmp_path / "copy")
    monkeypatch.chdir(tmp_path / "copy")
    calls = len(_calls())
    Path("models/after_s3").mkdir()
    Path("models/after_s3/model.safetensors").write_bytes(b"after_s3")
    doc = compare_run("compare.yaml", log=lambda m: None, cell_fn=fake_quantize)
    assert sorted(_calls()[calls:]) == ["after_s3/w4a8", "after_s3/w8a8"]
    assert doc["placements"]["b0w05"]["w8a8"]["simulation/ours"]["after"]["seeds"] == [0, 1, 2, 3]
    assert "after_s3/w8a8: skipped" not in Path("compare/compare.md").read_text()


def test_only_runs_the_selected_cells(study):
    doc = compare_run("compare.yaml", log=lambda m: None, cell_fn=fake_quantize, only=["after_s0", "*/w4a8"])
    ran = set(_calls())
    assert "after_s0/w8a8" in ran and "before_s1/w4a8" in ran and "before_s1/w8a8" not in ran
    cells = {c["label"]: c for c in doc["cells"]}
    assert cells["before_s1/w8a8"]["reason"] == "not selected (--only)"
    assert cells["after_s0/w8a8"]["status"] == "measured"


def no_logits(run, out_dir: Path, log) -> None:
    (out_dir / "report.json").write_text("{}")


def test_a_cell_without_logits_is_reported_not_read(study):
    doc = compare_run("compare.yaml", log=lambda m: None, cell_fn=no_logits, only=["after_s0/w8a8"])
    cell = next(c for c in doc["cells"] if c["label"] == "after_s0/w8a8")
    assert cell["status"] == "failed"
    assert cell["reason"] == f"the cell wrote no outputs.npz ({cell['dir']})"
    assert doc["measures"] == {} and doc["verdicts"] == {"w8a8": [], "w4a8": []}
    assert "- nothing measured yet" in Path("compare/compare.md").read_text()


def test_checkpoint_placement_must_match_the_study(study):
    cfg = yaml.safe_load(Path("compare.yaml").read_text())
    cfg["models"][0]["placement"] = "before"  # after_s0 is an SE-after model
    Path("compare.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(EffdeployError, match=r"models\.after_s0: placement 'before'"):
        compare_run("compare.yaml", log=lambda m: None, cell_fn=fake_quantize, only=["after_s0"])


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"models": [{"name": "a", "placement": "after", "seed": 0, "config": "c.yaml", "twin_of": "b"}]},
            "no model named 'b'",
        ),
        ({"models": [{"name": "a", "placement": "after", "seed": 0, "config": "c.yaml"}] * 2}, "names must be unique"),
        ({"models": [], "precisions": ["w8"]}, "'w8' is not w<2-8>a<2-16>"),
        ({"models": [{"name": "a/b", "placement": "after", "seed": 0, "config": "c.yaml"}]}, "letters, digits"),
        ({"models": [{"name": "a", "placement": "middle", "seed": 0, "config": "c.yaml"}]}, "placement"),
    ],
)
def test_bad_study_config_names_the_file_and_field(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(change))
    with pytest.raises(EffdeployError, match="bad.yaml: invalid config") as err:
        load_compare_config(path)
    assert message in str(err.value)


def test_shipped_study_config_is_valid(repo_root):
    cfg = load_compare_config(repo_root / "configs/study/compare.yaml")
    names = {m.name for m in cfg.models}
    assert {"after_s0", "before_s2", "none_s1", "d2_before_s0"} <= names
    twins = {m.name: m.twin_of for m in cfg.models if m.twin_of}
    assert twins == {f"before_reorder_s{s}": f"after_s{s}" for s in range(3)}
    for m in cfg.models:
        assert (repo_root / m.config).is_file(), m.config


def test_unequal_seed_counts_quote_the_shared_seeds_own_difference() -> None:
    """Three seeds against one: the interval judged is seed 0's paired one, and the words give that
    seed's own difference beside it (the seed means differ by something else)."""
    from effdeploy.study.compare import _noise

    pair = {
        "top1": {"a": [0.80, 0.81, 0.82], "b": [0.70], "difference": 0.11, "ci": None},
        "per_seed": [
            {
                "seed": 0,
                "difference": {"estimate": 0.2714, "low": 0.2568, "high": 0.2864},
                "mcnemar": {"p_exact": 1e-9},
            }
        ],
    }
    words, beyond = _noise(pair, 0.95)
    assert words.startswith("judged on seed 0, the only one both have: +27.14 points, 95% CI +25.68 to +28.64")
    assert "one seed each" not in words and beyond is True
    pair["top1"]["a"] = [0.80]  # one seed each: the seed's difference is the headline one
    assert _noise(pair, 0.95)[0].startswith("one seed each: 95% CI +25.68 to +28.64")
