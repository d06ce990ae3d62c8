"""`effdeploy quantize` end to end on a tiny checkpoint: report contents, plot, the reorder that a
different se_placement triggers, and bad-config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, colour_folder, run_cli

from effdeploy.config import RunConfig, parse
from effdeploy.errors import EffdeployError
from effdeploy.model.checkpoints import save_checkpoint
from effdeploy.model.efficientnet import build_model
from effdeploy.quant.pipeline import quantize_run

CIFAR_PRE = {
    "resize": "resize",
    "interpolation": "bilinear",
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.2470, 0.2435, 0.2616],
}


@pytest.fixture
def run(tmp_path: Path, repo_root: Path, monkeypatch) -> RunConfig:
    monkeypatch.setenv("EFFDEPLOY_CACHE", str(tmp_path / "cache"))
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
    ckpt = save_checkpoint(model.eval(), tmp_path / "tiny.safetensors")
    data = colour_folder(tmp_path / "data", per_class=12)
    return parse(
        RunConfig,
        {
            "name": "tiny",
            "checkpoint": str(ckpt),
            "model": json.loads(model.config.model_dump_json()),
            "data": {"train": str(data), "test": str(data), "val_fraction": 0.25},
            "reorder": {"steps": 3, "batch_size": 8, "warmup_steps": 1},
            "quant": {
                "precisions": ["w8a8", "w4a8"],
                "calibration": str(repo_root / "calibration/cifar10_train_512_seed0.safetensors"),
                "calibration_images": 32,
                "adaround_iters": 3,
                "snr_images": 8,
                "runtimes": ["onnxruntime"],
                "peers": False,
            },
        },
        "test",
    )


@pytest.mark.slow
def test_quantize_report(run: RunConfig, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = quantize_run(run, out, log=lambda m: None)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["name"] == "tiny" and (out / "snr_per_block.png").stat().st_size > 1000
    rows = on_disk["results"]
    assert [(r["precision"], r["method"]["name"]) for r in rows] == [
        ("w8a8", "minmax"),
        ("w8a8", "ours"),
        ("w4a8", "minmax"),
        ("w4a8", "ours"),
    ]
    # AdaRound only where weights have fewer than 8 bits ("auto"), never for the baseline
    assert [r["method"]["adaround"] for r in rows] == [False, False, False, True]
    n_blocks = len(build_model(run.model).arch.blocks)
    for r in rows:
        assert 0 <= r["top1"] <= 1 and 0 <= r["agreement"] <= 1
        assert len(r["worst_layers"]) == 3
        worst = [w["snr_db"] for w in r["worst_layers"]]
        finite = [v for v in r["layer_snr_db"].values() if isinstance(v, float)]  # "inf" = exact
        assert worst == sorted(worst) and worst[0] == min(finite)
        assert len(r["block_snr_db"]) == n_blocks
        assert {"input", "classifier"} <= set(r["layer_snr_db"])
    assert rows[2]["weight_bytes"] < rows[0]["weight_bytes"] < report["float"]["bytes"]
    # our method's QDQ artifact is written, runs in onnxruntime and is compared with the simulation
    for r in rows:
        arts = r["artifacts"]
        if r["method"]["name"] == "ours":
            a = arts["onnx_qdq"]
            assert (out / a["file"]).is_file() and a["runtime"] == "onnxruntime"
            # the exact int8 path exactly where the default one may saturate (x86 without VNNI)
            from effdeploy.runtime.cpu import int8_may_saturate

            assert a["session_options"]["session.x64quantprecision"] == int(int8_may_saturate())
            assert 0 <= a["agreement_with_simulation"] <= 1
            assert a["within_contract"] == (a["agreement_with_simulation"] >= 0.99 and abs(a["snr_gap_db"]) < 1)
            # per-layer SNR read from onnxruntime for every point the QDQ model materialises
            assert set(a["layer_snr_db"]) == set(r["layer_snr_db"]) - {"classifier"}
        else:
            assert arts == {}
    assert report["held_out"]["images"] == 36 and report["calibration"]["images"] == 32
    # per-image logits are stored for float and every variant, and reproduce the report's totals
    with np.load(out / "outputs.npz") as z:
        stored = {k: z[k] for k in z.files}
    assert set(stored) == {
        "labels",
        "float",
        "w8a8.minmax",
        "w8a8.ours",
        "w8a8.ours.onnx_qdq",
        "w4a8.minmax",
        "w4a8.ours",
        "w4a8.ours.onnx_qdq",
    }
    assert stored["labels"].shape == (36,) and stored["float"].shape == (36, run.model.num_classes)
    assert (stored["float"].argmax(1) == stored["labels"]).mean() == report["float"]["top1"]
    for r in rows:
        logits = stored[f"{r['precision']}.{r['method']['name']}"]
        assert (logits.argmax(1) == stored["labels"]).mean() == r["top1"]
        err = ((logits.astype(np.float64) - stored["float"]) ** 2).sum()
        assert abs(10 * np.log10((stored["float"].astype(np.float64) ** 2).sum() / err) - r["output_snr_db"]) < 1e-3
        if r["method"]["name"] == "ours":
            qdq = stored[f"{r['precision']}.ours.onnx_qdq"]
            assert (qdq.argmax(1) == stored["labels"]).mean() == r["artifacts"]["onnx_qdq"]["top1"]


@pytest.mark.slow
def test_quantize_with_tflite_and_peers(run: RunConfig, tmp_path: Path) -> None:
    """The full-integer TFLite artifact and the peers land in the report beside ours."""
    quant = run.quant.model_copy(update={"precisions": ("w8a8",), "runtimes": ("litert",), "peers": True})
    out = tmp_path / "out"
    report = quantize_run(run.model_copy(update={"quant": quant}), out, log=lambda m: None)
    ours = [r for r in report["results"] if r["method"]["name"] == "ours"][0]
    art = ours["artifacts"]["tflite_int8"]
    assert set(ours["artifacts"]) == {"tflite_int8"} and (out / art["file"]).is_file()
    assert art["input"]["dtype"] == "int8" and art["float_ops"] == []
    assert set(art["layer_snr_db"]) <= set(ours["layer_snr_db"]) and "input" in art["layer_snr_db"]
    assert [p["peer"] for p in report["peers"]] == [
        "ort-minmax",
        "ort-minmax-default-session",
        "ort-percentile",
        "aeq-static",
    ]
    # a peer that fails (onnxruntime's Percentile cannot histogram this random net's constant
    # tensors) is reported with its one-line error, not dropped and not fatal
    for p in report["peers"]:
        assert (out / p["file"]).is_file() if "error" not in p else p["error"].startswith(str(out))
    assert [p["peer"] for p in report["peers"] if "error" in p] in ([], ["ort-percentile"])


def test_quantize_learned_ranges_are_the_ones_reported(run: RunConfig, tmp_path: Path) -> None:
    """``learn_ranges`` runs in the pipeline, says what it moved, and the ranges the report (and
    so every emitter, which reads the same points) carries are the learned ones."""
    quant = run.quant.model_copy(update={"precisions": ("w8a8",), "learn_ranges": True, "learn_ranges_steps": 5})
    report = quantize_run(run.model_copy(update={"quant": quant}), tmp_path / "out", log=lambda m: None)
    minmax, ours = report["results"]
    assert ours["method"]["learn_ranges"] and not minmax["method"]["learn_ranges"]
    learned = ours["range_search"]["learned"]
    assert learned["points"] > 0 and learned["objective"] <= learned["objective_before"]
    ranges = {r["name"]: r["range"] for r in ours["ranges"]}
    assert learned["changed"]
    for name, change in learned["changed"].items():
        assert ranges[name] == pytest.approx(change["to"])


def test_quantize_reorders_when_placement_differs(run: RunConfig, tmp_path: Path) -> None:
    run = run.model_copy(
        update={"quant": run.quant.model_copy(update={"se_placement": "before", "precisions": ("w8a8",)})}
    )
    messages: list[str] = []
    report = quantize_run(run, tmp_path / "out", log=messages.append)
    assert report["se_placement"] == "before"
    assert report["reorder"]["from"] == "after" and report["reorder"]["to"] == "before"
    assert any("reordering" in m for m in messages)  # it says so


def test_quantize_missing_checkpoint(run: RunConfig, tmp_path: Path) -> None:
    run = run.model_copy(update={"checkpoint": tmp_path / "nope.safetensors"})
    with pytest.raises(EffdeployError, match="nope.safetensors"):
        quantize_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("quant_yaml", "field"),
    [
        ("precisions: [w9a8]", "precisions"),
        ("observer: median", "observer"),
        ("overrides: [{pattern: '('}]", "overrides"),
        ("adaround_iter: 5", "adaround_iter"),
        ("by_precision: {w4a9x: {range_search: true}}", "by_precision"),
        ("by_precision: {w4a8: {range_search_objective: snr}}", "range_search_objective"),
        ("by_precision: {w4a8: {precisions: [w8a8]}}", "precisions"),
        ("learn_ranges_steps: 0", "learn_ranges_steps"),
    ],
)
def test_quantize_bad_config_is_one_line(tmp_path: Path, repo_root: Path, quant_yaml: str, field: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"quant:\n  {quant_yaml}\n")
    line = assert_one_line_error(run_cli("quantize", "--config", str(cfg), cwd=repo_root))
    assert field in line


def test_holdout_never_measures_an_image_its_quantization_saw(run: RunConfig, monkeypatch) -> None:
    import torch

    from effdeploy.quant import pipeline
    from effdeploy.results import holdout

    parts = holdout.folds_of(10, 3, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(10)) and len(parts) == 3
    with pytest.raises(ValueError, match="--folds"):
        holdout.folds_of(10, 1, seed=0)

    seen = []
    real = pipeline.calibrated_sim

    def spy(model, q, method, precision, batches):
        seen.append(torch.cat(batches))
        return real(model, q, method, precision, batches)

    monkeypatch.setattr(pipeline, "calibrated_sim", spy)
    report = holdout.cross_validate(run, ["w8a8"], folds=2, seed=0, log=lambda m: None)
    assert [r["method"]["name"] for r in report["rows"]] == ["minmax", "ours"]
    assert report["images"] == 32 and len(seen) == 4  # 2 methods x 2 folds
    # each fold's calibration images are the other fold's: disjoint halves covering the set
    a, b = seen[0], seen[1]
    assert len(a) + len(b) == 32
    assert not any(torch.equal(img, other) for img in a for other in b)
    for r in report["rows"]:
        assert 0 <= r["top1"] <= 1 and 0 <= r["agreement"] <= 1 and r["output_snr_db"] > 0


def test_by_precision_changes_only_its_precision() -> None:
    """A ``by_precision`` entry changes the method of that precision and no other."""
    from effdeploy.config import QuantConfig
    from effdeploy.quant.pipeline import methods_for

    q = parse(
        QuantConfig,
        {
            "range_search": True,
            "by_precision": {"w4a8": {"range_search_objective": "kl", "bias_correction": False, "learn_ranges": True}},
        },
        "test",
    )
    run = RunConfig(quant=q)
    ours = {p: next(m for m in methods_for(run, p) if m.name == "ours") for p in ("w8a8", "w4a8")}
    assert (ours["w8a8"].range_search_objective, ours["w8a8"].bias_correction) == ("relative", True)
    assert (ours["w4a8"].range_search_objective, ours["w4a8"].bias_correction) == ("kl", False)
    assert ours["w4a8"].range_search and ours["w4a8"].adaround and not ours["w8a8"].adaround
    assert ours["w4a8"].learn_ranges and not ours["w8a8"].learn_ranges
    assert q.for_precision("w8a8") is q


def test_summary_marks_runtime_cells_outside_the_contract() -> None:
    """The headline table says 'contract missed' on a runtime cell below 99% agreement or 1 dB
    or more from its simulation, and only there."""
    from effdeploy.results.quant_summary import headline_rows

    def artifact(agreement: float, gap: float) -> dict:
        return {"top1": 0.8, "output_snr_db": 12.0 - gap, "agreement_with_simulation": agreement, "snr_gap_db": gap}

    ours = {"name": "ours", "range_search": False, "learn_ranges": False}
    report = {
        "name": "m",
        "float": {"top1": 0.8},
        "results": [
            {
                "precision": "w8a8",
                "method": ours,
                "top1_delta": 0.0,
                "output_snr_db": 12.0,
                "artifacts": {"onnx_qdq": artifact(0.995, 0.2), "tflite_int8": artifact(0.979, 0.2)},
            },
            {
                "precision": "w4a8",
                "method": ours,
                "top1_delta": 0.0,
                "output_snr_db": 12.0,
                "artifacts": {"onnx_qdq": artifact(1.0, 1.1), "tflite_int8": artifact(0.99, -0.5)},
            },
        ],
    }
    w8, w4 = (line.split(" | ") for line in headline_rows(report))
    assert "contract missed" not in w8[5] and "contract missed" in w8[6]
    assert "contract missed" in w4[5] and "contract missed" not in w4[6]


def test_a_registered_pass_runs_and_is_reported(run: RunConfig, tmp_path: Path) -> None:
    """A pass registered from outside the package runs in its place in the order, lands in the
    report (method, pass report) and in the label, with no other module touched."""
    from effdeploy.quant import registry
    from effdeploy.report import method_label

    order: list[str] = []
    real = registry.get_pass("bias_correction")

    def spy_bias(sim, batches, q):
        order.append("bias_correction")
        return real.apply(sim, batches, q)

    def halve_ranges(sim, batches, q):
        order.append("halve")
        return {"points": len(sim.ranges())}

    registry.register_pass("halve", order=35, label="halved ranges", enabled=lambda q, wb: True)(halve_ranges)
    registry.register_pass("bias_correction", order=40, enabled=real.enabled)(spy_bias)
    try:
        quant = run.quant.model_copy(update={"precisions": ("w8a8",)})
        report = quantize_run(run.model_copy(update={"quant": quant}), tmp_path / "out", log=lambda m: None)
        labels = [method_label(r["method"]) for r in report["results"]]
    finally:
        registry.unregister_pass("halve")
        registry.register_pass("bias_correction", order=40, enabled=real.enabled)(real.apply)
    minmax, ours = report["results"]
    assert order == ["halve", "bias_correction"]  # only "ours" runs passes, in registry order
    assert ours["method"]["passes"] == ["halve", "bias_correction"] and ours["method"]["halve"] is True
    assert minmax["method"]["passes"] == [] and minmax["method"]["halve"] is False
    assert ours["pass_reports"] == {"halve": {"points": len(ours["ranges"])}}
    assert labels == ["minmax", "ours + halved ranges"]


def test_labels_of_reports_written_before_the_pass_list() -> None:
    """Older reports name passes only by true keys: their labels are unchanged."""
    from effdeploy.report import method_label

    old = {"name": "ours", "range_search": True, "learn_ranges": True, "range_search_objective": "kl"}
    assert method_label(old) == "ours + range search + learned ranges (KL)"
    assert method_label({"name": "ours", "learn_ranges": True, "saturate_sigmoid_inputs": False}) == (
        "ours + learned ranges, no sigmoid saturation"
    )


@pytest.mark.slow
def test_trained_model_meets_the_runtime_contract(repo_root: Path, shared_data: Path, tmp_path, monkeypatch) -> None:
    """The shipped CIFAR-10 model at W8A8 (the cheap default passes: percentile ranges, bias
    correction, sigmoid saturation): onnxruntime's integer model agrees with the simulation on
    >= 99% of top-1 decisions and its output SNR is within 1 dB of the simulation's."""
    from effdeploy.config import load_run_config

    ckpt = repo_root / "models/cifar10_b0w05_after/model.safetensors"
    test_dir = shared_data / "cifar10" / "test"
    if not ckpt.is_file() or not test_dir.is_dir():
        pytest.skip(f"needs the trained checkpoint {ckpt} and the CIFAR-10 test split {test_dir}")
    monkeypatch.setenv("EFFDEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(repo_root)  # the config's paths are relative to the repository
    run = load_run_config(repo_root / "configs/cifar10_b0w05_after.yaml")
    quant = run.quant.model_copy(
        update={
            "precisions": ("w8a8",),
            "by_precision": {},
            "learn_ranges": False,
            "range_search": False,
            "peers": False,
            "runtimes": ("onnxruntime",),
            "calibration_images": 64,
            "eval_data": test_dir,
            "eval_images": 300,
            "snr_images": 32,
        }
    )
    report = quantize_run(run.model_copy(update={"quant": quant}), tmp_path / "out", log=lambda m: None)
    _, ours = report["results"]
    ort = ours["artifacts"]["onnx_qdq"]
    assert report["held_out"]["images"] == 300
    assert report["float"]["top1"] >= 0.78  # measured 0.813 on these 300 images
    # measured: agreement 1.0, SNR gap 0.01 dB, onnxruntime vs simulation 37 dB
    assert ort["within_contract"], ort
    assert ort["agreement_with_simulation"] >= 0.99 and abs(ort["snr_gap_db"]) < 1, ort
    assert ours["output_snr_db"] > 12.0  # measured 12.9 dB
    assert ours["top1"] >= report["float"]["top1"] - 0.03  # measured 0.800 (-1.3 points)


def test_labels_say_what_stays_wider() -> None:
    """A W4A4 label names what an override keeps at 8 bits, weights and activations apart, and
    a by_precision entry's overrides replace the section's at that precision only."""
    from effdeploy.report import method_label, wider_layers

    config = {
        "overrides": [{"pattern": r"^stem\.conv$", "weight_bits": 8}],
        "by_precision": {
            "w4a4": {
                "overrides": [
                    {"pattern": "^input$", "act_bits": 8},
                    {"pattern": r"\.se\.pool$", "act_bits": 8},
                    {"pattern": "^classifier$", "weight_bits": 8, "act_bits": 8},
                    {"pattern": "^head", "act_bits": 4},  # not wider than a4: not named
                ]
            }
        },
    }
    assert wider_layers(config, "w4a8") == ["stem.conv: 8-bit weights"]
    assert wider_layers(config, "w8a8") == []  # 8 bits is not wider than w8
    assert method_label({"name": "ours"}, wider_layers(config, "w4a4")) == (
        "ours (input, se.pool, classifier: 8-bit activations; classifier: 8-bit weights)"
    )
