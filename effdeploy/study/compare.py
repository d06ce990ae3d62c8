"""`effdeploy compare`: does moving SE before the depthwise conv make a quantized EfficientNet
better, by how much, at which bit width, on which runtime?

Every model of the study (placement x training seed, reordered twins, a deeper variant) is
quantized at every precision as one cached sweep cell (study/sweep.py); this module only reads
what the cells wrote (outputs.npz: per-image logits; report.json: per-block SNR) and states:
top-1 with its interval over test images, the spread over training seeds, output SNR, paired
tests of a model against its reordered twin and of placements against each other, and for each
bit width a verdict in words. compare.md, compare.json and the PNGs are derived from the cells
alone, so a rerun regenerates them byte for byte.
"""

from __future__ import annotations

import fnmatch
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from effdeploy.config import PRECISION_RE, SePlacement, load_yaml, parse
from effdeploy.errors import EffdeployError
from effdeploy.study import stats
from effdeploy.study.cache import Cell
from effdeploy.study.sweep import run_cells

PLACEMENTS = ("after", "before", "none")
PLACEMENT_NAMES = {"after": "SE after", "before": "SE before", "none": "no SE"}
Runtime = Literal["simulation", "onnxruntime", "litert"]
# where each (runtime, method) lives in outputs.npz, after "{precision}."
ARRAY_SUFFIX = {
    ("simulation", "minmax"): "minmax",
    ("simulation", "ours"): "ours",
    ("onnxruntime", "ours"): "ours.onnx_qdq",
    ("litert", "ours"): "ours.tflite_int8",
}
OUTPUTS = "outputs.npz"  # what `effdeploy quantize` writes beside report.json (per-image logits)
ARTIFACT_KEY = {"onnxruntime": "onnx_qdq", "litert": "tflite_int8"}
ARTIFACT_FILE = {"onnxruntime": "model_{precision}.onnx", "litert": "model_{precision}.tflite"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StudyModel(_Strict):
    """One trained network of the study."""

    name: str  # how tables and --only name it, e.g. after_s1
    placement: SePlacement
    seed: int = Field(ge=0)
    # models compared across seeds share a group (same architecture, trained the same way)
    group: str = "b0w05"
    config: Path  # its run config: checkpoint, data, quant section
    checkpoint: Path | None = None  # another checkpoint than the config's (a reordered twin)
    twin_of: str | None = None  # this model is that model reordered (same weights): paired against it
    overrides: dict[str, Any] = {}  # changes to the config for this model's cells
    bench: Path | None = None  # bench.json (or its folder) with latency and size; default: the cell's

    @field_validator("name")
    @classmethod
    def _plain(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"{v!r}: letters, digits, '_', '.', '-' only (it names cells)")
        return v


class CompareConfig(_Strict):
    precisions: tuple[str, ...] = ("w8a8", "w4a8", "w4a4")
    methods: tuple[Literal["minmax", "ours"], ...] = ("minmax", "ours")
    runtimes: tuple[Runtime, ...] = ("simulation", "onnxruntime", "litert")
    models: tuple[StudyModel, ...]
    overrides: dict[str, Any] = {}  # changes to every model's config (e.g. quant.peers off)
    cache: Path = Path("benchmarks/results/study")
    out: Path = Path("benchmarks/results/compare")
    resamples: int = Field(stats.DEFAULT_RESAMPLES, ge=100)
    level: float = Field(stats.DEFAULT_LEVEL, gt=0.5, lt=1)
    seed: int = 0  # of every bootstrap (each interval draws from its own stream, by label)
    jobs: int = Field(1, ge=1)
    only: tuple[str, ...] = ()  # cell labels (model/precision) or model names, shell patterns
    ray_address: str | None = None

    @field_validator("precisions")
    @classmethod
    def _precisions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for p in value:
            if not re.match(PRECISION_RE, p):
                raise ValueError(f"{p!r} is not w<2-8>a<2-16> (e.g. w8a8, w4a8)")
        return value

    @model_validator(mode="after")
    def _names(self) -> CompareConfig:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"models: names must be unique ({', '.join(dup)} repeated)")
        for m in self.models:
            if m.twin_of is not None and m.twin_of not in names:
                raise ValueError(f"models.{m.name}.twin_of: no model named {m.twin_of!r}")
        return self


def load_compare_config(path: str | Path) -> CompareConfig:
    return parse(CompareConfig, load_yaml(path), str(path))


# ---- cells ------------------------------------------------------------------------------------


def cell_label(model: str, precision: str) -> str:
    return f"{model}/{precision}"


def study_cells(cfg: CompareConfig) -> list[Cell]:
    """One cell per model and precision: the model's config with the study's and its own changes."""
    from effdeploy.config import deep_merge

    cells = []
    for m in cfg.models:
        overrides = deep_merge(cfg.overrides, m.overrides)
        overrides = deep_merge(overrides, {"model": {"se_placement": m.placement}})
        if m.checkpoint is not None:
            # a reordered twin reuses its origin's config: its own checkpoint, named after its folder
            overrides = {**overrides, "checkpoint": str(m.checkpoint), "name": m.checkpoint.parent.name}
        for p in cfg.precisions:
            cells.append(Cell(cell_label(m.name, p), m.config, p, overrides))
    return cells


def selector(patterns: Sequence[str]):
    """Whether a cell is selected by ``--only`` patterns (matched on "model/precision" and "model")."""
    if not patterns:
        return None

    def selected(cell: Cell) -> bool:
        model = cell.label.split("/")[0]
        return any(fnmatch.fnmatchcase(cell.label, p) or fnmatch.fnmatchcase(model, p) for p in patterns)

    return selected


# ---- measurements of one cell -------------------------------------------------------------------


@dataclass
class CellData:
    """What one cell wrote, as the study reads it."""

    labels: np.ndarray
    float_logits: np.ndarray
    arrays: dict[str, np.ndarray]  # "{runtime}/{method}" -> logits
    missing: dict[str, str]  # "{runtime}/{method}" -> why it is not there
    report: dict
    bench: dict[str, dict] = field(default_factory=dict)  # runtime -> {latency_ms, size_mb}


def variants(cfg: CompareConfig) -> list[tuple[str, str]]:
    return [(r, m) for r in cfg.runtimes for m in cfg.methods if (r, m) in ARRAY_SUFFIX]


def vname(runtime: str, method: str) -> str:
    return f"{runtime}/{method}"


def load_cell(cfg: CompareConfig, model: StudyModel, precision: str, cell_dir: Path) -> CellData:
    report = json.loads((cell_dir / "report.json").read_text())
    if report.get("se_placement") not in (None, model.placement):
        raise EffdeployError(
            f"models.{model.name}: placement {model.placement!r} in the study config, but its checkpoint "
            f"has se_placement={report['se_placement']!r} ({cell_dir / 'report.json'})"
        )
    with np.load(cell_dir / OUTPUTS) as npz:
        data = {k: npz[k] for k in npz.files}
    arrays, missing = {}, {}
    for runtime, method in variants(cfg):
        key = f"{precision}.{ARRAY_SUFFIX[runtime, method]}"
        if key in data:
            arrays[vname(runtime, method)] = data[key]
        else:
            missing[vname(runtime, method)] = _why_missing(report, precision, runtime, key)
    bench = _bench(model.bench or cell_dir, precision)
    return CellData(data["labels"], data["float"], arrays, missing, report, bench)


def _why_missing(report: dict, precision: str, runtime: str, key: str) -> str:
    if runtime in ARTIFACT_KEY:
        for row in report.get("results", []):
            if row["precision"] == precision and row["method"]["name"] == "ours":
                art = row.get("artifacts", {}).get(ARTIFACT_KEY[runtime])
                if art and "skipped" in art:
                    return f"{runtime} skipped: {art['skipped']}"
                if not art:
                    return f"{runtime} not run (quant.runtimes)"
    return f"{key} not in outputs.npz"


def _bench(where: Path, precision: str) -> dict[str, dict]:
    """Median latency and size per runtime from a bench report, where one exists."""
    path = where / "bench.json" if where.is_dir() else where
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    records = data.get("records", []) if isinstance(data, dict) else data
    out = {}
    for runtime, pattern in ARTIFACT_FILE.items():
        name = pattern.format(precision=precision)
        for r in records:
            if r.get("artifact") == name and r.get("backend") == runtime and r.get("status", "ok") == "ok":
                lat = (r.get("latency_ms") or {}).get("median")
                out[runtime] = {"latency_ms": lat, "size_mb": r.get("size_mb")}
                break
    return out


def block_snr(report: dict, precision: str, method: str) -> dict[str, float] | None:
    for row in report.get("results", []):
        if row["precision"] == precision and row["method"]["name"] == method:
            return row.get("block_snr_db")
    return None


# ---- analysis ---------------------------------------------------------------------------------


class Study:
    """The measured cells and every statistic derived from them."""

    def __init__(self, cfg: CompareConfig, data: dict[tuple[str, str], CellData]) -> None:
        self.cfg, self.data = cfg, data
        self.models = {m.name: m for m in cfg.models}
        self._correct: dict[tuple[str, str, str], np.ndarray] = {}

    def _rng(self, *parts: str):
        """A bootstrap stream of its own per interval: adding a model never moves another's CI."""
        return np.random.SeedSequence([self.cfg.seed, zlib.crc32("|".join(parts).encode())])

    def correct(self, model: str, precision: str, variant: str) -> np.ndarray | None:
        key = (model, precision, variant)
        if key not in self._correct:
            d = self.data.get((model, precision))
            if d is None:
                return None
            logits = d.float_logits if variant == "float" else d.arrays.get(variant)
            if logits is None:
                return None
            self._correct[key] = stats.correct(logits, d.labels)
        return self._correct[key]

    def paired_ok(self, a: tuple[str, str], b: tuple[str, str]) -> bool:
        da, db = self.data.get(a), self.data.get(b)
        return da is not None and db is not None and np.array_equal(da.labels, db.labels)

    def measure(self, model: str, precision: str, variant: str) -> dict:
        """Top-1 with its image interval, output SNR and the change from float, of one variant."""
        d = self.data[(model, precision)]
        c = self.correct(model, precision, variant)
        if c is None:
            return {"missing": d.missing.get(variant, "not measured")}
        kw = {"resamples": self.cfg.resamples, "level": self.cfg.level}
        out = {"top1": stats.bootstrap_ci(c, seed=self._rng(model, precision, variant), **kw).to_dict()}
        if variant == "float":
            return out
        out["snr_db"] = stats.output_snr_db(d.float_logits, d.arrays[variant])
        f = self.correct(model, precision, "float")
        out["vs_float"] = stats.paired_bootstrap_ci(
            c, f, seed=self._rng(model, precision, variant, "float"), **kw
        ).to_dict()
        runtime = variant.split("/")[0]
        if runtime in d.bench:
            out.update(d.bench[runtime])
        return out

    def paired(self, a: tuple[str, str, str], b: tuple[str, str, str]) -> dict:
        """a - b on the same images: paired bootstrap interval and McNemar's test."""
        ca, cb = self.correct(*a), self.correct(*b)
        kw = {"resamples": self.cfg.resamples, "level": self.cfg.level}
        ci = stats.paired_bootstrap_ci(ca, cb, seed=self._rng(*a, "vs", *b), **kw)
        return {"difference": ci.to_dict(), "mcnemar": stats.mcnemar(ca, cb).to_dict()}


def _groups(cfg: CompareConfig) -> list[str]:
    """Groups of independently trained models, in config order (twins are not a group of their own)."""
    out: list[str] = []
    for m in cfg.models:
        if m.twin_of is None and m.group not in out:
            out.append(m.group)
    return out


def analyse(cfg: CompareConfig, data: dict[tuple[str, str], CellData]) -> dict:
    st = Study(cfg, data)
    variant_names = ["float"] + [vname(r, m) for r, m in variants(cfg)]
    measures: dict[str, dict] = {}
    for m in cfg.models:
        for p in cfg.precisions:
            if (m.name, p) in data:
                measures.setdefault(m.name, {})[p] = {v: st.measure(m.name, p, v) for v in variant_names}

    placements: dict = {}
    differences: dict = {}
    for g in _groups(cfg):
        members = [m for m in cfg.models if m.group == g and m.twin_of is None]
        for p in cfg.precisions:
            for v in variant_names:
                by_pl: dict[str, list[StudyModel]] = {}
                for m in members:
                    if "top1" in measures.get(m.name, {}).get(p, {}).get(v, {}):
                        by_pl.setdefault(m.placement, []).append(m)
                if not by_pl:
                    continue
                spread = {}
                for pl in PLACEMENTS:
                    if pl not in by_pl:
                        continue
                    ms = by_pl[pl]
                    entry = {
                        "models": [m.name for m in ms],
                        "seeds": [m.seed for m in ms],
                        "top1": stats.seed_spread(
                            [measures[m.name][p][v]["top1"]["estimate"] for m in ms], level=cfg.level
                        ).to_dict(),
                    }
                    if v != "float":
                        snrs = [measures[m.name][p][v]["snr_db"] for m in ms]
                        entry["snr_db"] = stats.seed_spread(snrs, level=cfg.level).to_dict()
                    spread[pl] = entry
                placements.setdefault(g, {}).setdefault(p, {})[v] = spread
                pairs = []
                present = [pl for pl in PLACEMENTS if pl in by_pl]
                for i, a in enumerate(present):
                    for b in present[i + 1 :]:
                        pairs.append(_placement_pair(st, cfg, measures, p, v, a, by_pl[a], b, by_pl[b]))
                if pairs:
                    differences.setdefault(g, {}).setdefault(p, {})[v] = pairs

    twins = []
    for m in cfg.models:
        if m.twin_of is None:
            continue
        for p in cfg.precisions:
            for v in variant_names:
                a, b = (m.name, p, v), (m.twin_of, p, v)
                if st.correct(*a) is None or st.correct(*b) is None or not st.paired_ok(a[:2], b[:2]):
                    continue
                twins.append({"twin": m.name, "origin": m.twin_of, "precision": p, "variant": v, **st.paired(a, b)})

    twin_summary: dict = {}
    for p in cfg.precisions:
        for v in variant_names:
            diffs = [t["difference"]["estimate"] for t in twins if t["precision"] == p and t["variant"] == v]
            if diffs:
                twin_summary.setdefault(p, {})[v] = stats.seed_spread(diffs, level=cfg.level).to_dict()
    result = {
        "measures": measures,
        "placements": placements,
        "differences": differences,
        "twins": twins,
        "twin_summary": twin_summary,
    }
    result["verdicts"] = verdicts(cfg, result)
    return result


def _placement_pair(st: Study, cfg, measures, p, v, a, ma, b, mb) -> dict:
    top_a = [measures[m.name][p][v]["top1"]["estimate"] for m in ma]
    top_b = [measures[m.name][p][v]["top1"]["estimate"] for m in mb]
    out = {"a": a, "b": b, "top1": stats.compare_seeds(top_a, top_b, level=cfg.level).to_dict()}
    if v != "float":
        snr_a = [measures[m.name][p][v]["snr_db"] for m in ma]
        snr_b = [measures[m.name][p][v]["snr_db"] for m in mb]
        out["snr_db"] = stats.compare_seeds(snr_a, snr_b, level=cfg.level).to_dict()
    per_seed = []
    seeds_b = {m.seed: m for m in mb}
    for m in ma:
        other = seeds_b.get(m.seed)
        if other is not None and st.paired_ok((m.name, p), (other.name, p)):
            per_seed.append(
                {"seed": m.seed, "a": m.name, "b": other.name, **st.paired((m.name, p, v), (other.name, p, v))}
            )
    out["per_seed"] = per_seed
    return out


# ---- words --------------------------------------------------------------------------------------


def _pts(x: float, sign: bool = True) -> str:
    return f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def _variant_words(v: str) -> str:
    runtime, _, method = v.partition("/")
    if v == "float":
        return "float (PyTorch)"
    return f"simulation, {method}" if runtime == "simulation" else f"{runtime} ({method})"


def _noise(pair: dict, level: float) -> tuple[str, bool | None]:
    """The interval a difference is judged by, in words, and whether it excludes 0 (None: unknown)."""
    pct = f"{100 * level:.0f}%"
    ci = pair["top1"]["ci"]
    if ci is not None:
        n_a, n_b = len(pair["top1"]["a"]), len(pair["top1"]["b"])
        words = f"{pct} CI {_pts(ci['low'])} to {_pts(ci['high'])} over {n_a} + {n_b} seeds"
        return words, ci["low"] > 0 or ci["high"] < 0
    if len(pair["per_seed"]) == 1:
        ps = pair["per_seed"][0]
        d, mc = ps["difference"], ps["mcnemar"]
        if len(pair["top1"]["a"]) == len(pair["top1"]["b"]) == 1:
            scope = "one seed each:"
        else:
            # the means above are over unequal seed counts; the interval is the shared seed's alone
            scope = f"judged on seed {ps['seed']}, the only one both have: {_pts(d['estimate'])} points,"
        words = (
            f"{scope} {pct} CI {_pts(d['low'])} to {_pts(d['high'])} over test images only, "
            f"McNemar p = {mc['p_exact']:.3g}; training-seed noise not measured"
        )
        return words, d["low"] > 0 or d["high"] < 0
    return "no interval: fewer than 2 seeds and no shared seed", None


def verdicts(cfg: CompareConfig, result: dict) -> dict[str, list[str]]:
    """Per precision, one sentence per group and runtime: which placement wins, by how much, and
    whether that exceeds the noise."""
    out: dict[str, list[str]] = {}
    groups = _groups(cfg)
    for p in cfg.precisions:
        lines = []
        for g in groups:
            for v, spread in result["placements"].get(g, {}).get(p, {}).items():
                if v == "float":
                    continue
                line = _verdict_line(cfg, g, v, spread, result["differences"].get(g, {}).get(p, {}).get(v, []))
                lines.append(f"{g}, {_variant_words(v)}: {line}")
        for v, spread in result["twin_summary"].get(p, {}).items():
            if v != "float":
                lines.append(
                    _twin_line(cfg, v, spread, [t for t in result["twins"] if (t["precision"], t["variant"]) == (p, v)])
                )
        out[p] = lines
    return out


def _twin_line(cfg, v: str, spread: dict, twins: list[dict]) -> str:
    """Reordering the same weights: the mean paired difference over seeds (t interval), or the one
    twin's paired bootstrap and McNemar test."""
    pct = f"{100 * cfg.level:.0f}%"
    head = f"reordered twins (same weights, SE moved before), {_variant_words(v)}: twin - origin "
    if spread["ci"] is not None:
        ci = spread["ci"]
        beyond = ci["low"] > 0 or ci["high"] < 0
        return (
            f"{head}{_pts(spread['mean'])} points on average over {len(twins)} seeds ({pct} CI {_pts(ci['low'])} "
            f"to {_pts(ci['high'])}): " + ("beyond the noise" if beyond else "within the noise")
        )
    t = twins[0]
    d, mc = t["difference"], t["mcnemar"]
    beyond = d["low"] > 0 or d["high"] < 0
    return (
        f"{head}{_pts(d['estimate'])} points for {t['twin']} vs {t['origin']} ({pct} CI {_pts(d['low'])} to "
        f"{_pts(d['high'])} over test images, McNemar p = {mc['p_exact']:.3g} on {mc['discordant']} discordant "
        "images; one seed, training-seed noise not measured): " + ("beyond the noise" if beyond else "within the noise")
    )


def _verdict_line(cfg, group: str, v: str, spread: dict, pairs: list[dict]) -> str:
    ranked = sorted(spread, key=lambda pl: (-spread[pl]["top1"]["mean"], PLACEMENTS.index(pl)))
    means = ", ".join(
        f"{PLACEMENT_NAMES[pl]} {_pts(spread[pl]['top1']['mean'], False)}% "
        f"({len(spread[pl]['seeds'])} seed{'s' if len(spread[pl]['seeds']) > 1 else ''}, "
        f"{spread[pl]['snr_db']['mean']:.2f} dB)"
        for pl in ranked
    )
    if len(ranked) < 2:
        return f"only {means} measured"
    best = ranked[0]
    parts = []
    for other in ranked[1:]:
        pair = next(q for q in pairs if {q["a"], q["b"]} == {best, other})
        sign = 1 if pair["a"] == best else -1
        flipped = _flip(pair) if sign < 0 else pair
        diff = flipped["top1"]["difference"]
        words, beyond = _noise(flipped, cfg.level)
        verdict = {True: "beyond the noise", False: "within the noise", None: "noise unknown"}[beyond]
        parts.append(
            f"{PLACEMENT_NAMES[best]} {'wins over' if beyond else 'leads'} {PLACEMENT_NAMES[other]} by "
            f"{_pts(diff)} points ({words}): {verdict}"
        )
    return f"{means}. " + "; ".join(parts) + "."


def _flip(pair: dict) -> dict:
    """The same comparison as b - a."""

    def neg_ci(ci):
        if ci is None:
            return None
        return {**ci, "estimate": -ci["estimate"], "low": -ci["high"], "high": -ci["low"]}

    top1 = pair["top1"]
    per_seed = []
    for ps in pair["per_seed"]:
        mc = ps["mcnemar"]
        per_seed.append(
            {
                **ps,
                "a": ps["b"],
                "b": ps["a"],
                "difference": neg_ci(ps["difference"]),
                "mcnemar": {**mc, "only_a": mc["only_b"], "only_b": mc["only_a"]},
            }
        )
    return {
        **pair,
        "a": pair["b"],
        "b": pair["a"],
        "top1": {**top1, "a": top1["b"], "b": top1["a"], "difference": -top1["difference"], "ci": neg_ci(top1["ci"])},
        "per_seed": per_seed,
    }


# ---- files --------------------------------------------------------------------------------------


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def plot_block_snr(cfg: CompareConfig, data: dict[tuple[str, str], CellData], group: str, path: Path) -> bool:
    """Per-block SNR of our simulation, one panel per precision, one line per model, coloured
    by placement (reordered twins of the group's models dashed). False when nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from effdeploy.fileio import atomic_path

    colours = {"after": "tab:blue", "before": "tab:orange", "none": "tab:green"}
    members = [m for m in cfg.models if m.group == group and m.twin_of is None]
    names = {m.name for m in members}
    members += [m for m in cfg.models if m.twin_of in names]
    panels = [p for p in cfg.precisions if any((m.name, p) in data for m in members)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], panels, strict=True):
        ticks = None
        labelled: set[str] = set()
        for m in members:
            d = data.get((m.name, p))
            curve = block_snr(d.report, p, "ours") if d else None
            if not curve:
                continue
            ticks = [n.split(".")[1] if "." in n else n for n in curve]
            twin = m.twin_of is not None
            kind = f"{PLACEMENT_NAMES[m.placement]}{' (reordered)' if twin else ''}"
            label = None if kind in labelled else kind  # one legend entry per kind; seeds share it
            labelled.add(kind)
            ax.plot(
                range(len(curve)),
                [float(x) if not isinstance(x, str) else float("nan") for x in curve.values()],
                color="tab:red" if twin else colours[m.placement],
                linestyle="--" if twin else "-",
                marker="o",
                markersize=3,
                linewidth=1.2,
                label=label,
            )
        if ticks:
            ax.set_xticks(range(len(ticks)), ticks, rotation=70, fontsize=7)
        ax.set_title(f"{p}, simulation (ours)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("SNR of block output vs float (dB)")
    fig.suptitle(f"{group}: per-block SNR by SE placement (one line per seed)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return True


def _ci_cell(ci: dict | None, sign: bool = False) -> str:
    return "-" if ci is None else f"[{_pts(ci['low'], sign)}, {_pts(ci['high'], sign)}]"


def markdown(cfg: CompareConfig, config_path: Path, result: dict, cells: list[dict], plots: list[str]) -> list[str]:
    pct = f"{100 * cfg.level:.0f}%"
    lines = [
        "# SE placement: after vs before the depthwise conv, quantized",
        "",
        f"Generated by `effdeploy compare --config {config_path}` from the cached cells in `{cfg.cache}/cells/`.",
    ]
    held = result.get("test_images")
    if held:
        lines.append(f"Test images: {held['images']} from `{held['data']}`, the same for every cell.")
    lines += [
        f"Top-1 intervals: {pct} percentile bootstrap over test images ({cfg.resamples:,} resamples). Across "
        f"seeds: mean, sample SD and {pct} t interval; placement differences: Welch t interval over seeds, or "
        "paired bootstrap over test images and McNemar's exact test when only one seed exists. Output SNR: "
        "10*log10(sum(float^2) / sum((q - float)^2)) over all test-image logits.",
        "",
        "## Verdicts",
        "",
    ]
    for p, vs in result["verdicts"].items():
        lines.append(f"**{p.upper()}**")
        lines.append("")
        lines += [f"- {v}" for v in vs] if vs else ["- nothing measured yet"]
        lines.append("")

    for g, by_p in result["placements"].items():
        lines += [
            f"## {g}: top-1 and output SNR per placement",
            "",
            "| precision | runtime | placement | seeds | top-1 % | "
            f"{pct} CI | SD over seeds | per seed: top-1 % [{pct} image CI] | output SNR dB (SD) | vs float, points |",
            "|---|---|---|---:|---:|---|---:|---|---:|---:|",
        ]
        for p, by_v in by_p.items():
            for v, spread in by_v.items():
                if v == "float" and p != next(iter(by_p)):
                    continue  # float does not depend on the precision
                for pl, e in spread.items():
                    t = e["top1"]
                    ci = _ci_cell(t["ci"]) if t["ci"] else "(one seed)"
                    sd = "-" if t["sd"] is None else f"{100 * t['sd']:.2f}"
                    per = "; ".join(
                        f"s{s} {_pts(result['measures'][n][p][v]['top1']['estimate'], False)} "
                        f"{_ci_cell(result['measures'][n][p][v]['top1'])}"
                        for n, s in zip(e["models"], e["seeds"], strict=True)
                    )
                    if "snr_db" in e:
                        s = e["snr_db"]
                        snr = f"{s['mean']:.2f}" + ("" if s["sd"] is None else f" ({s['sd']:.2f})")
                        drops = [result["measures"][n][p][v]["vs_float"]["estimate"] for n in e["models"]]
                        vs_float = _pts(float(np.mean(drops)))
                    else:
                        snr = vs_float = "-"
                    lines.append(
                        f"| {p if v != 'float' else 'fp32'} | {_variant_words(v)} | {PLACEMENT_NAMES[pl]} | "
                        f"{len(e['seeds'])} | {_pts(t['mean'], False)} | {ci} | {sd} | {per} | {snr} | {vs_float} |"
                    )
        lines.append("")

    for g, by_p in result["differences"].items():
        lines += [
            f"## {g}: placement differences (a - b, top-1 points)",
            "",
            f"| precision | runtime | a - b | mean difference | {pct} CI over seeds | SNR difference dB | "
            "same seed, same images: difference [CI], McNemar p |",
            "|---|---|---|---:|---|---:|---|",
        ]
        for p, by_v in by_p.items():
            for v, pairs in by_v.items():
                if v == "float" and p != next(iter(by_p)):
                    continue
                for q in pairs:
                    t = q["top1"]
                    ci = _ci_cell(t["ci"], sign=True) if t["ci"] else t["note"]
                    snr = f"{q['snr_db']['difference']:+.2f}" if "snr_db" in q else "-"
                    per = "; ".join(
                        f"s{s['seed']} {_pts(s['difference']['estimate'])} {_ci_cell(s['difference'], sign=True)}, "
                        f"p = {s['mcnemar']['p_exact']:.3g}"
                        for s in q["per_seed"]
                    )
                    lines.append(
                        f"| {p if v != 'float' else 'fp32'} | {_variant_words(v)} | {q['a']} - {q['b']} | "
                        f"{_pts(t['difference'])} | {ci} | {snr} | {per or '-'} |"
                    )
        lines.append("")

    if result["twins"]:
        lines += [
            "## Reordered twins: the same weights with SE moved before the depthwise conv (+ distillation)",
            "",
            f"| precision | runtime | twin - origin | top-1 % twin / origin | difference, points [{pct} paired CI] | "
            "discordant images (twin only / origin only) | McNemar p (exact) | chi-square p |",
            "|---|---|---|---|---:|---|---:|---:|",
        ]
        first = {}
        for t in result["twins"]:
            first.setdefault(t["twin"], t["precision"])
            if t["variant"] == "float" and t["precision"] != first[t["twin"]]:
                continue
            mt = result["measures"][t["twin"]][t["precision"]][t["variant"]]["top1"]["estimate"]
            mo = result["measures"][t["origin"]][t["precision"]][t["variant"]]["top1"]["estimate"]
            d, mc = t["difference"], t["mcnemar"]
            lines.append(
                f"| {t['precision'] if t['variant'] != 'float' else 'fp32'} | {_variant_words(t['variant'])} | "
                f"{t['twin']} - {t['origin']} | {_pts(mt, False)} / {_pts(mo, False)} | "
                f"{_pts(d['estimate'])} {_ci_cell(d, sign=True)} | {mc['only_a']} / {mc['only_b']} | "
                f"{mc['p_exact']:.3g} | {mc['p_chi2']:.3g} |"
            )
        lines.append("")

    bench_rows = []
    for name, by_p in result["measures"].items():
        for p, by_v in by_p.items():
            for v, m in by_v.items():
                if m.get("latency_ms") is not None or m.get("size_mb") is not None:
                    lat = "-" if m.get("latency_ms") is None else f"{m['latency_ms']:.3f}"
                    size = "-" if m.get("size_mb") is None else f"{m['size_mb']:.2f}"
                    bench_rows.append(f"| {name} | {p} | {_variant_words(v)} | {lat} | {size} |")
    if bench_rows:
        lines += [
            "## Latency and size (bench reports; compare latencies only within one bench run)",
            "",
            "| model | precision | runtime | median ms (batch 1) | size MB |",
            "|---|---|---|---:|---:|",
            *bench_rows,
            "",
        ]

    if plots:
        lines += ["## Per-block SNR (simulation, ours)", ""]
        lines += [f"![per-block SNR]({name})" for name in plots]
        lines.append("")

    missing = [c for c in cells if c["status"] != "measured"]
    gaps = [
        f"- {name}/{p} {v}: {m['missing']}"
        for name, by_p in result["measures"].items()
        for p, by_v in by_p.items()
        for v, m in by_v.items()
        if "missing" in m
    ]
    if missing or gaps:
        lines += ["## Not measured", ""]
        lines += [f"- {c['label']}: {c['status']}: {c['reason']}" for c in missing]
        lines += gaps
        lines.append("")
    return lines


def compare_run(
    config_path: str | Path,
    out: str | Path | None = None,
    log=print,
    *,
    jobs: int | None = None,
    only: Sequence[str] | None = None,
    ray_address: str | None = None,
    cell_fn=None,
) -> dict:
    """Quantize every study cell not cached yet, then write compare.md, compare.json and the
    per-block SNR PNGs into ``out`` (default: the config's ``out``). ``jobs``, ``only`` and
    ``ray_address`` override the config's. Returns what compare.json holds."""
    from effdeploy.fileio import atomic_write_text
    from effdeploy.report import json_safe, write_markdown

    config_path = Path(config_path)
    cfg = load_compare_config(config_path)
    out = Path(out) if out is not None else cfg.out
    cells = study_cells(cfg)
    outcomes = run_cells(
        cells,
        cfg.cache,
        jobs=jobs if jobs is not None else cfg.jobs,
        ray_address=ray_address if ray_address is not None else cfg.ray_address,
        cell_fn=cell_fn,
        selected=selector(only if only is not None else cfg.only),
        log=log,
    )
    models = {m.name: m for m in cfg.models}
    data: dict[tuple[str, str], CellData] = {}
    cell_rows = []
    for cell, o in zip(cells, outcomes, strict=True):
        name, precision = cell.label.split("/")
        row = {"label": o.label, "key": o.key, "dir": o.dir, "status": "measured" if o.ok else o.status}
        lacking = [f for f in (OUTPUTS, "report.json") if o.ok and not (Path(o.dir) / f).is_file()]
        if lacking:
            row["status"], o.reason = "failed", f"the cell wrote no {' or '.join(lacking)} ({o.dir})"
        if row["status"] == "measured":
            data[(name, precision)] = load_cell(cfg, models[name], precision, Path(o.dir))
        else:
            row["reason"] = o.reason
        cell_rows.append(row)
    for row in cell_rows:
        if row["status"] != "measured":
            log(f"  {row['label']}: {row['status']} ({row['reason']})")

    result = analyse(cfg, data)
    first = next(iter(data.values()), None)
    if first is not None:
        held = first.report.get("held_out", {})
        result = {"test_images": {"images": len(first.labels), "data": held.get("data")}, **result}
    plots = []
    for g in _groups(cfg):
        name = f"snr_per_block_{_slug(g)}.png"
        if plot_block_snr(cfg, data, g, out / name):
            plots.append(name)
    document = {
        "command": f"effdeploy compare --config {config_path}",
        "config": json.loads(cfg.model_dump_json()),
        "cells": cell_rows,
        **result,
        "plots": plots,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(json_safe(document), indent=2) + "\n")
    write_markdown(out / "compare.md", markdown(cfg, config_path, result, cell_rows, plots))
    return document
