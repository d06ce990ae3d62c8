"""Bench output: one table (the terminal, and Markdown appended run by run) and one plot."""

from __future__ import annotations

from pathlib import Path

COLUMNS = ("format", "backend", "device", "status", "size MB", "top-1", "SNR dB", "ms median", "ms p90", "FPS")


def _num(v, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):  # json_safe's "inf"
        return v
    return format(v, fmt)


def rows(result: dict, status_width: int | None = 60) -> list[list[str]]:
    out = []
    for r in result["records"]:
        lat = r.get("latency_ms") or {}
        med = lat.get("median")
        name = r["artifact"] if r["artifact"] == "pytorch" else f"{r['artifact']} ({r['precision']})"
        backend = r["backend"]
        if r["backend"] == "litert" and r["options"].get("xnnpack") is False:
            backend += " (no XNNPACK)"
        extra = r["options"].get("delegate") or r["options"].get("mode_name")
        if extra and r["backend"] in ("android", "edgetpu"):
            backend += f" ({extra})"
        top1 = r.get("top1")
        out.append(
            [
                name,
                backend,
                r["device"],
                r["status"]
                if status_width is None or len(r["status"]) <= status_width
                else r["status"][: status_width - 3] + "...",
                _num(r.get("size_mb"), ".2f"),
                "-" if top1 is None else f"{100 * top1:.2f}%",
                _num(r.get("snr_db"), ".2f"),
                _num(med, ".3f"),
                _num(lat.get("p90"), ".3f"),
                _num(1000.0 / med if med else None, ".0f"),
            ]
        )
    return out


def header_line(result: dict) -> str:
    m, o = result["machine"], result["options"]
    cpu = m["cpu"]
    flags = " ".join(cpu["flags"]) or "no int8 ISA flags"
    return (
        f"{result['name']} at {result['time']} on {cpu['model']} ({cpu['arch']}; {flags}; "
        f"{m['usable_cores']} cores); batch 1, {o['threads']} thread(s), {o['warmup']} warm-up + "
        f"{o['runs']} timed runs x {o['repeats']} repeats, round-robin; SNR/top-1 on {o['images']} images"
    )


def markdown(result: dict) -> list[str]:
    lines = [f"### {header_line(result)}", ""]
    if result.get("command"):
        lines += [f"Command: `{result['command']}`", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows(result, None)]
    skipped = [r for r in result["records"] if r["status"] != "ok" and r.get("notes")]
    if skipped:
        lines += ["", "Notes on the records that did not run:", ""]
        lines += [f"- {r['artifact']} on {r['backend']}: " + "; ".join(r["notes"]) for r in skipped]
    if result["ratios"]:
        lines += ["", "Median latency against float on the same runtime (one run):", ""]
        lines += [
            f"- {r['artifact']} on {r['backend']}: {r['ratio']:.2f}x of {r['reference']}" for r in result["ratios"]
        ]
    if result["too_noisy"]:
        lines += ["", "Too noisy (repeat medians differ by more than 10%): " + ", ".join(result["too_noisy"])]
    return lines + [""]


def append_markdown(result: dict, path: Path) -> None:
    """Append this run's table: bench.md is the log of every run in this directory."""
    path = Path(path)
    new = not path.exists()
    with open(path, "a") as f:
        if new:
            f.write("# Bench log\n\nOne section per `effdeploy bench` run, newest last.\n\n")
        f.write("\n".join(markdown(result)) + "\n")


def plot(result: dict, path: Path) -> None:
    """Top-1 (or SNR) against median latency, one point per record that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from effdeploy.fileio import atomic_path

    pts = [
        r
        for r in result["records"]
        if r["status"] == "ok" and r.get("latency_ms") and isinstance(r.get("snr_db"), (int, float))
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "top1", "top-1 (%)"), (axes[1], "snr_db", "output SNR vs float (dB)")):
        for r in pts:
            v = r.get(key)
            if v is None:
                continue
            v = 100 * v if key == "top1" else v
            marker = {"onnxruntime": "o", "litert": "s", "torch": "*", "android": "^", "edgetpu": "D"}.get(
                r["backend"], "x"
            )
            ax.scatter(r["latency_ms"]["median"], v, marker=marker)
            ax.annotate(f"{r['artifact']}\n{r['backend']}", (r["latency_ms"]["median"], v), fontsize=6)
        ax.set_xlabel("median latency, batch 1 (ms)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['name']}: {result['machine']['cpu']['model']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def print_bench(result: dict) -> None:
    from rich.table import Table

    from effdeploy.report import _console

    t = Table(title=header_line(result), title_justify="left")
    for c in COLUMNS:
        t.add_column(
            c, justify="right" if c in ("size MB", "top-1", "SNR dB", "ms median", "ms p90", "FPS") else "left"
        )
    for row in rows(result):
        t.add_row(*row)
    con = _console()
    con.print(t)
    for r in result["ratios"]:
        con.print(f"  {r['artifact']} on {r['backend']}: {r['ratio']:.2f}x the median latency of {r['reference']}")
    if result["too_noisy"]:
        con.print("  too noisy (repeat medians differ by >10%): " + ", ".join(result["too_noisy"]))
