"""The quantization summary (benchmarks/results/quant_summary.md): `effdeploy quantize` reports side
by side, ours beside the min-max baseline, our runtime artifacts and the peers.

Every number comes from the reports; nothing is typed in by hand, so the table regenerates
byte for byte from the report copies kept beside it.
"""

from __future__ import annotations

from pathlib import Path

from effdeploy.metrics import within_contract
from effdeploy.quant.registry import all_passes, passes_of
from effdeploy.report import method_label, wider_layers

HEADLINE_HEADER = [
    "| model | precision | float top-1 | min-max (sim) | ours (sim) | ours, onnxruntime (agreement w/ sim) "
    "| ours, LiteRT int8 (agreement w/ sim) | best peer |",
    "|---|---|---:|---:|---:|---:|---:|---:|",
]


def run_name(report: dict) -> str:
    """The model name, with the optional passes of its "ours" rows and ``no_saturation`` where they
    ran without sigmoid saturation (so that two runs of one config, with and without a pass, are
    two files)."""
    ours = [r["method"] for r in report["results"] if r["method"]["name"] == "ours"]
    named = {p.name for p in all_passes() if p.label}
    passes = [p.name for p in all_passes() if p.name in named and any(p.name in passes_of(m) for m in ours)]
    if any(m.get("saturate_sigmoid_inputs") is False for m in ours):  # on by default
        passes.append("no_saturation")
    return "_".join([report["name"], *passes])


def file_names(reports: list[dict]) -> list[str]:
    """One name per report for its copies (``quant_<name>.json``): ``run_name``, with the report's
    precisions appended where an earlier report already took that name (a second run of one
    config, e.g. another precision, keeps its own files)."""
    used: set[str] = set()
    names = []
    for report in reports:
        name = run_name(report)
        if name in used:
            name += "_" + "_".join(dict.fromkeys(r["precision"] for r in report["results"]))
        used.add(name)
        names.append(name)
    return names


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def rows_for(report: dict) -> list[str]:
    """The detail table of one report: every method, our runtime artifacts and the peers."""
    f = report["float"]["top1"]
    lines = []
    name = run_name(report)
    for r in report["results"]:
        m = r["method"]
        wider = wider_layers(report.get("config", {}), r["precision"])
        label = (
            method_label({"name": "min-max, nearest (baseline)"}, wider)
            if m["name"] == "minmax"
            else f"{method_label(m, wider)} (simulation)"
        )
        worst = ", ".join(f"{w['name'].removeprefix('blocks.')} {w['snr_db']:.1f}" for w in r["worst_layers"])
        lines.append(
            f"| {name} | {r['precision']} | {label} | {_pct(r['top1'])} | {100 * r['top1_delta']:+.2f} | "
            f"{_pct(r['agreement'])} | {r['output_snr_db']:.2f} dB | {worst} | {r['weight_bytes'] / 1e6:.2f} MB |"
        )
        for a in r.get("artifacts", {}).values():
            if "skipped" in a:
                lines.append(f"| {name} | {r['precision']} | ours, {a['runtime']} | skipped: {a['skipped']} |||||| ")
                continue
            lines.append(
                f"| {name} | {r['precision']} | ours, {a['file']} in {a['runtime']} | {_pct(a['top1'])} | "
                f"{100 * (a['top1'] - f):+.2f} | "
                f"{_pct(a['agreement_with_float'])} | {a['output_snr_db']:.2f} dB | "
                f"agreement with simulation {_pct(a['agreement_with_simulation'])}, "
                f"SNR gap {a['snr_gap_db']:+.2f} dB | {a['bytes'] / 1e6:.2f} MB (file) |"
            )
    for p in report.get("peers", []):
        if "error" in p:
            lines.append(f"| {name} | {p['precision']} | peer {p['peer']} | failed: {p['error']} |||||| ")
            continue
        opts = "x64quantprecision" if p["session_options"].get("session.x64quantprecision") else ""
        if p["tool"] == "onnxruntime" and not opts:
            opts = "default session"
        lines.append(
            f"| {name} | {p['precision']} | peer {p['peer']} ({p['calibration']}{', ' + opts if opts else ''}) | "
            f"{_pct(p['top1'])} | {100 * p['top1_delta']:+.2f} | {_pct(p['agreement'])} | "
            f"{p['output_snr_db']:.2f} dB | | {p['bytes'] / 1e6:.2f} MB (file) |"
        )
    return lines


def _same(report: dict) -> bool:
    """Whether the measurement images are the calibration images (reports before this flag existed
    are judged by their paths)."""
    held = report["held_out"]
    if "same_as_calibration" in held:
        return bool(held["same_as_calibration"])
    return Path(held["data"]).resolve() == Path(report["calibration"]["file"]).resolve()


def _cell(delta: float, snr: float, extra: str = "") -> str:
    return f"{100 * delta:+.2f} / {snr:.2f} dB{extra}"


def headline_rows(report: dict) -> list[str]:
    """One row per precision: change in top-1 vs float / output SNR, for the baseline, ours
    (simulation and each runtime, with its top-1 agreement with the simulation) and the best
    peer by output SNR."""
    f = report["float"]["top1"]
    lines = []
    for precision in dict.fromkeys(r["precision"] for r in report["results"]):
        rows = {r["method"]["name"]: r for r in report["results"] if r["precision"] == precision}
        base, ours = rows.get("minmax"), rows.get("ours")
        cells = [run_name(report), precision, _pct(f)]
        cells.append(_cell(base["top1_delta"], base["output_snr_db"]) if base else "")
        cells.append(_cell(ours["top1_delta"], ours["output_snr_db"]) if ours else "")
        for key in ("onnx_qdq", "tflite_int8"):
            a = (ours or {}).get("artifacts", {}).get(key)
            if a is None or "skipped" in a:
                cells.append("n/a" if a is None else "no int4-activation kernel")
            else:
                missed = "" if within_contract(a) else ", contract missed"
                cells.append(
                    _cell(a["top1"] - f, a["output_snr_db"], f" ({_pct(a['agreement_with_simulation'])}{missed})")
                )
        peers = [p for p in report.get("peers", []) if p["precision"] == precision and "error" not in p]
        if peers:
            best = max(peers, key=lambda p: p["output_snr_db"])
            cells.append(_cell(best["top1_delta"], best["output_snr_db"], f" {best['peer']}"))
        else:
            cells.append("none for this precision")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def headline_table(reports: list[dict]) -> list[str]:
    """The headline table of every report, header included."""
    return HEADLINE_HEADER + [line for report in reports for line in headline_rows(report)]


def summary_markdown(command: str, reports: list[dict], names: list[str]) -> str:
    """The whole summary: an introduction naming ``command``, the headline table, then one section
    per report under its file name (``file_names``)."""
    lines = [
        "# Quantization results",
        "",
        f"Generated by `{command}` from the",
        "reports `effdeploy quantize` wrote. Top-1 and agreement (top-1 equal to float's) on the held-out",
        "images; output SNR = 10*log10(sum(float^2) / sum((q - float)^2)) on the logits. Runtime rows",
        "(onnxruntime, LiteRT) run our artifacts; peer rows run the other tools' artifacts. A runtime",
        "cell says 'contract missed' where the artifact agrees with its simulation on under 99% of",
        "top-1 or its output SNR is 1 dB or more away from the simulation's.",
        "",
        "Each cell: change in top-1 vs float / output SNR.",
        "",
        *headline_table(reports),
        "",
    ]
    for report, name in zip(reports, names, strict=True):
        f = report["float"]
        held = report["held_out"]
        lines += [
            f"## {name} (se_placement={report['se_placement']})",
            "",
            f"Float top-1 {_pct(f['top1'])} on {held['images']} "
            f"{'images, the calibration images themselves' if _same(report) else 'held-out images'}"
            f" ({held['data']}); calibration: "
            f"{report['calibration']['images']} images from `{report['calibration']['file']}`.",
            "",
            "| model | precision | pipeline | top-1 | vs float | agreement | output SNR "
            "| worst 3 layers (dB) / vs simulation | size |",
            "|---|---|---|---:|---:|---:|---:|---|---:|",
            *rows_for(report),
            "",
        ]
    return "\n".join(lines) + "\n"
