"""Human-facing output: rich tables, and JSON that stays valid (no bare Infinity/NaN)."""

from __future__ import annotations

from effdeploy.fileio import json_safe  # noqa: F401 -- re-exported: report writers use it from here
from effdeploy.model.arch import PAPER_GFLOPS


def _console():
    import sys

    from rich.console import Console

    # a pipe gets a wide, plain table rather than rich's 80-column default
    return Console(width=None if sys.stdout.isatty() else 140)


def _m(n: int) -> str:
    return f"{n / 1e6:,.3f} M"


def print_profile(prof, show_blocks: bool = False) -> None:
    from rich.table import Table

    console = _console()
    t = Table(title=f"EfficientNet-{prof.variant.upper()}  se_placement={prof.se_placement}  {prof.resolution}px")
    t.add_column("layer kind")
    t.add_column("params", justify="right")
    t.add_column("MACs", justify="right")
    t.add_column("% MACs", justify="right")
    for kind, v in prof.per_kind.items():
        t.add_row(kind, f"{v['params']:,}", _m(v["macs"]), f"{100 * v['macs'] / prof.macs:.1f}")
    t.add_row("total", f"{prof.params:,}", _m(prof.macs), "100.0", style="bold")
    console.print(t)
    console.print(f"elementwise ops (SE multiply, residual adds, pooling): {_m(prof.elementwise)}")
    if show_blocks:
        b = Table(title="per block (ds ratio = depthwise+project cost / standard KxK conv; formula 1/C_out + 1/K^2)")
        for col in ("block", "in", "exp", "out", "k", "s", "size", "params", "MACs", "ds ratio", "formula"):
            b.add_column(col, justify="right" if col != "block" else "left")
        for r in prof.blocks:
            b.add_row(
                r.name,
                str(r.in_channels),
                str(r.expand_channels),
                str(r.out_channels),
                str(r.kernel),
                str(r.stride),
                f"{r.in_size}->{r.out_size}",
                f"{r.params:,}",
                _m(r.macs),
                f"{r.ds_ratio:.4f}",
                f"{r.ds_ratio_formula:.4f}",
            )
        console.print(b)


def family_markdown(rows) -> str:
    lines = [
        "| model | resolution | params | MACs (ours) | FLOPs (paper) |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in rows:
        paper = PAPER_GFLOPS[p.variant]
        lines.append(f"| {p.variant.upper()} | {p.resolution} | {p.params:,} | {p.macs / 1e9:.2f} G | {paper} G |")
    return "\n".join(lines)


def print_family(rows) -> None:
    print(family_markdown(rows))


def print_fidelity(result) -> None:
    """The export table: one row per artifact, measured against PyTorch."""
    from rich.table import Table

    fid = result.manifest["fidelity"]
    t = Table(title=f"{result.manifest['name']}: fidelity vs PyTorch on {fid['images']} images from {fid['data']}")
    for col in ("artifact", "runtime", "size", "max |diff|", "SNR (dB)", "top-1 agreement"):
        t.add_column(col, justify="left" if col in ("artifact", "runtime") else "right")
    sizes = {f["format"]: f["bytes"] for f in result.manifest["files"]}
    for fmt, m in result.fidelity.items():
        t.add_row(
            str(result.files[fmt]),
            m["runtime"],
            f"{sizes[fmt] / 1e6:.2f} MB",
            f"{m['max_abs_diff']:.2e}",
            f"{m['snr_db']:.1f}",
            f"{100 * m['top1_agreement']:.2f}%",
        )
    _console().print(t)
    print(f"manifest: {result.out_dir / 'manifest.json'}")


def method_label(method: dict, wider: list[str] | tuple[str, ...] = ()) -> str:
    """``ours``, with the optional passes it ran named (range search is off by default) and the
    layers and points a per-layer override keeps wider than the precision says (``wider_layers``)."""
    from effdeploy.quant.registry import pass_labels, passes_of

    label = method["name"]
    passes = pass_labels(passes_of(method))
    if passes:
        label += " + " + " + ".join(passes) + (" (KL)" if method.get("range_search_objective") == "kl" else "")
    if label.startswith("ours") and method.get("saturate_sigmoid_inputs") is False:
        label += ", no sigmoid saturation"  # on by default (reports before it existed lack the key)
    return label + (f" ({'; '.join(wider)})" if wider else "")


def wider_layers(config: dict, precision: str) -> list[str]:
    """What the per-layer overrides keep wider than ``precision`` says, one entry per kind and
    width, e.g. ``"stem.conv, classifier: 8-bit weights"`` or ``"input, se.pool: 8-bit
    activations"``: a label must say what is not at the precision it names. The overrides of a
    ``by_precision`` entry replace the section's at that precision."""
    import re

    from effdeploy.config import parse_precision

    wb, ab = parse_precision(precision)
    overrides = config.get("by_precision", {}).get(precision, {}).get("overrides", config.get("overrides", ()))
    groups: dict[tuple[str, int], list[str]] = {}
    for o in overrides:
        for kind, key, base in (("weights", "weight_bits", wb), ("activations", "act_bits", ab)):
            if o.get(key) is not None and o[key] > base:
                groups.setdefault((kind, o[key]), []).append(re.sub(r"[\\^$]", "", o["pattern"]).strip("."))
    return [f"{', '.join(names)}: {bits}-bit {kind}" for (kind, bits), names in groups.items()]


def print_quant(report: dict) -> None:
    """The quantize table: one row per precision and method, beside float."""
    from rich.table import Table

    from effdeploy.metrics import within_contract

    held = report["held_out"]
    t = Table(
        title=f"{report['name']} (se_placement={report['se_placement']}): {held['images']} held-out images, "
        f"layer SNR on {held['snr_images']}; {report['runtime']}"
    )
    for col in ("precision", "method", "top-1", "vs float", "agreement", "output SNR", "worst 3 layers (dB)", "size"):
        t.add_column(col, justify="left" if col in ("precision", "method", "worst 3 layers (dB)") else "right")
    f = report["float"]
    t.add_row("fp32", "-", f"{100 * f['top1']:.2f}%", "", "", "", "", f"{f['bytes'] / 1e6:.2f} MB")
    for r in report["results"]:
        worst = ", ".join(f"{w['name'].removeprefix('blocks.')} {w['snr_db']:.1f}" for w in r["worst_layers"])
        t.add_row(
            r["precision"],
            method_label(r["method"], wider_layers(report.get("config", {}), r["precision"])),
            f"{100 * r['top1']:.2f}%",
            f"{100 * r['top1_delta']:+.2f}",
            f"{100 * r['agreement']:.2f}%",
            f"{r['output_snr_db']:.2f} dB",
            worst,
            f"{r['weight_bytes'] / 1e6:.2f} MB",
        )
    _console().print(t)
    rt = Table(
        title="runtime artifacts vs the simulation of their configuration (same held-out images; "
        "contract: agreement >= 99%, |gap| < 1 dB)"
    )
    cols = ("precision", "file", "runtime", "agreement w/ sim", "SNR vs float", "gap to sim", "contract", "options")
    for col in cols:
        rt.add_column(
            col, justify="left" if col in ("precision", "file", "runtime", "contract", "options") else "right"
        )
    for r in report["results"]:
        for a in r.get("artifacts", {}).values():
            if "skipped" in a:
                rt.add_row(r["precision"], "-", a["runtime"], "", "", "", "", f"skipped: {a['skipped']}")
                continue
            opts = ", ".join(f"{k}={v}" for k, v in a["session_options"].items() if v is not None)
            rt.add_row(
                r["precision"],
                a["file"],
                a["runtime"],
                f"{100 * a['agreement_with_simulation']:.2f}%",
                f"{a['output_snr_db']:.2f} dB",
                f"{a['snr_gap_db']:+.2f} dB",
                "met" if within_contract(a) else "missed",
                opts,
            )
    if rt.row_count:
        _console().print(rt)
    peers = [p for p in report.get("peers", []) if "error" not in p]
    if peers:
        pt = Table(
            title="peers: the tools users would otherwise pick, same float model, calibration and held-out images"
        )
        for col in (
            "precision",
            "peer",
            "calibration",
            "top-1",
            "vs float",
            "agreement",
            "output SNR",
            "size",
            "options",
        ):
            pt.add_column(col, justify="left" if col in ("precision", "peer", "calibration", "options") else "right")
        for p in peers:
            opts = ", ".join(f"{k}={v}" for k, v in p["session_options"].items() if v is not None)
            pt.add_row(
                p["precision"],
                p["peer"],
                p["calibration"],
                f"{100 * p['top1']:.2f}%",
                f"{100 * p['top1_delta']:+.2f}",
                f"{100 * p['agreement']:.2f}%",
                f"{p['output_snr_db']:.2f} dB",
                f"{p['bytes'] / 1e6:.2f} MB",
                opts,
            )
        _console().print(pt)


def write_markdown(path, lines: list[str]) -> None:
    """A benchmark's Markdown result: written atomically, echoed to stdout, its path last."""
    from pathlib import Path

    from effdeploy.fileio import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
