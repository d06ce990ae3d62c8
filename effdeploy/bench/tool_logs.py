"""Parsers for the text the on-device benchmark tools print: numbers in, plain dicts out.

Two tools, several generations each:

- LiteRT / TFLite ``benchmark_model`` (``tflite/tools/benchmark``): one stats line per run loop
  (``count=.. first=.. curr=.. min=.. max=.. avg=.. std=..``, newer builds add
  ``p5=.. median=.. p95=..``; ``count=0``; ``count=N curr=X`` with ``(all same)`` when N > 1;
  TF1 builds print ``curr=`` before ``count=``), the summary ``Inference timings in us: ..`` (TF1:
  ``Average inference timings in us: ..``), memory lines and delegate lines. The first stats line
  is the warm-up loop, the last one the timed loop. Lines may or may not carry ``INFO:``.
- LiteRT ``benchmark_litert_model`` (CompiledModel) and its Python twin ``litert-benchmark``:
  padded ``Label: value`` lines, read by label, never by column.

The tools print microseconds (``benchmark_model``) or milliseconds (``benchmark_litert_model``);
every time returned here is in milliseconds, memory in MB, and what a log does not say is ``None``.
"""

from __future__ import annotations

import math
import re

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf"
_PREFIX = r"^\s*(?:(?:INFO|WARN|WARNING|ERROR):\s*)?"

# A stats line starts (after the optional log prefix) with count= or, in TF1 builds, curr=.
# Anchoring there keeps op-profiling lines such as "Timings (microseconds): count=.." out.
_STATS_LINE = re.compile(_PREFIX + r"(?:count|curr)=\d")
_PAIR = re.compile(r"\b(count|first|curr|min|max|avg|std|p5|median|p95)=(" + _NUM + r")")

_TIMINGS = re.compile(r"Inference timings in us:(.*)$")
_TIMINGS_TF1 = re.compile(r"Average inference timings in us:(.*)$")
_TIMING_ITEM = re.compile(r"(Init|First inference|Warmup \(avg\)|Inference \(avg\)|Warmup|Inference):\s*(" + _NUM + ")")

_MODEL_SIZE = re.compile(r"The input model file size \(MB\):\s*(" + _NUM + ")")
_FOOTPRINT = re.compile(
    r"Memory footprint delta from the start of the tool \(MB\):\s*init=(" + _NUM + r")\s+overall=(" + _NUM + ")"
)
_PEAK = re.compile(r"Overall peak memory footprint \(MB\) via periodic monitoring:\s*(" + _NUM + ")")
_PEAK_TF2 = re.compile(r"Peak memory footprint \(MB\):\s*init=(" + _NUM + r")\s+overall=(" + _NUM + ")")

_APPLIED = re.compile(
    r"Explicitly applied (.+?) delegate, and the model graph will be (completely|partially) executed by the"
    r" delegate(?: w/ (\d+) delegate kernels)?"
)
_NOT_APPLIED = re.compile(r"Though (.+?) delegate is explicitly applied, the model graph will not be executed")
_FAILED = re.compile(r"Failed to apply (.+?) delegate")
_NNAPI_ACCELERATORS = re.compile(r"NNAPI accelerators available:\s*\[(.*?)\]")


def _num(text: str) -> float:
    return float(text)


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1000.0


def parse_stats_line(line: str) -> dict | None:
    """One ``count=..`` stats line as milliseconds, or ``None`` if the line is not one.

    ``count=N curr=X`` (all runs equal) gives min = max = mean = median = X and std = 0.
    """
    if not _STATS_LINE.match(line):
        return None
    values = {key: _num(value) for key, value in _PAIR.findall(line)}
    if "count" not in values:
        return None
    count = int(values["count"])
    keys = ("first", "curr", "min", "max", "avg", "std", "p5", "median", "p95")
    out: dict = {"count": count, "all_same": False, **{f"{k}_ms": None for k in keys}}
    if count == 0:
        return out
    if "min" not in values and "curr" in values:  # every run took the same time
        x = values["curr"]
        values = {"first": x, "curr": x, "min": x, "max": x, "avg": x, "std": 0.0, "median": x, "p5": x, "p95": x}
        out["all_same"] = True
    for k in keys:
        if k in values and not math.isnan(values[k]):
            out[f"{k}_ms"] = _ms(values[k])
    return out


def parse_benchmark_model(text: str) -> dict:
    """Everything a ``benchmark_model`` log says, in ms and MB.

    ``warmup`` / ``inference``: the first / last stats line (a log with a single stats line has
    only the timed one). ``delegates``: one entry per delegate line, with ``coverage`` one of
    ``complete``, ``partial``, ``none``; ``delegate_failures``: delegates the tool could not apply.
    """
    out: dict = {
        "stats": [],
        "warmup": None,
        "inference": None,
        "init_ms": None,
        "first_inference_ms": None,
        "warmup_avg_ms": None,
        "inference_avg_ms": None,
        "model_size_mb": None,
        "init_footprint_mb": None,
        "overall_footprint_mb": None,
        "peak_memory_mb": None,
        "peak_init_mb": None,
        "delegates": [],
        "delegate_failures": [],
        "nnapi_accelerators": None,
        "errors": [],
    }
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        stats = parse_stats_line(line)
        if stats is not None:
            out["stats"].append(stats)
            continue
        if m := _TIMINGS.search(line):
            items = dict(_TIMING_ITEM.findall(m.group(1)))
            out["init_ms"] = _ms(_opt(items.get("Init")))
            out["first_inference_ms"] = _ms(_opt(items.get("First inference")))
            out["warmup_avg_ms"] = _ms(_opt(items.get("Warmup (avg)")))
            out["inference_avg_ms"] = _ms(_opt(items.get("Inference (avg)")))
        elif m := _TIMINGS_TF1.search(line):
            items = dict(_TIMING_ITEM.findall(m.group(1)))
            out["warmup_avg_ms"] = _ms(_opt(items.get("Warmup")))
            out["init_ms"] = _ms(_opt(items.get("Init")))
            out["inference_avg_ms"] = _ms(_opt(items.get("Inference")))
        elif m := _MODEL_SIZE.search(line):
            out["model_size_mb"] = _num(m.group(1))
        elif m := _FOOTPRINT.search(line):
            out["init_footprint_mb"], out["overall_footprint_mb"] = _num(m.group(1)), _num(m.group(2))
        elif m := _PEAK.search(line):
            out["peak_memory_mb"] = _num(m.group(1))
        elif m := _PEAK_TF2.search(line):
            out["peak_init_mb"], out["peak_memory_mb"] = _num(m.group(1)), _num(m.group(2))
        elif m := _APPLIED.search(line):
            coverage = "complete" if m.group(2) == "completely" else "partial"
            kernels = int(m.group(3)) if m.group(3) else (1 if coverage == "complete" else None)
            out["delegates"].append({"delegate": m.group(1), "coverage": coverage, "kernels": kernels})
        elif m := _NOT_APPLIED.search(line):
            out["delegates"].append({"delegate": m.group(1), "coverage": "none", "kernels": 0})
        elif m := _NNAPI_ACCELERATORS.search(line):
            out["nnapi_accelerators"] = [a.strip() for a in m.group(1).split(",") if a.strip()]
        if m := _FAILED.search(line):
            out["delegate_failures"].append(m.group(1))
        if re.match(r"^\s*(?:ERROR|FATAL):", line):
            out["errors"].append(re.sub(r"^\s*(?:ERROR|FATAL):\s*", "", line))
    if out["stats"]:
        out["inference"] = out["stats"][-1]
        if len(out["stats"]) > 1:
            out["warmup"] = out["stats"][0]
    return out


def _opt(text: str | None) -> float | None:
    if text is None:
        return None
    value = _num(text)
    return None if math.isnan(value) else value


# benchmark_litert_model: label -> key. Values are ms unless the key says otherwise.
_LITERT_LABELS = {
    "Model initialization": "init_ms",
    "Warmup (first)": "warmup_first_ms",
    "Warmup (avg)": "warmup_avg_ms",
    "Inference (avg)": "avg_ms",
    "Inference (min)": "min_ms",
    "Inference (max)": "max_ms",
    "Inference (median)": "median_ms",
    "Inference (std)": "std_ms",
    "Inference (p5)": "p5_ms",
    "Inference (p95)": "p95_ms",
    "Throughput": "throughput_mb_s",
    "Fully accelerated": "fully_accelerated",
    "Init footprint": "init_footprint_mb",
    "Overall footprint": "overall_footprint_mb",
    "Peak memory": "peak_memory_mb",
}
_LITERT_LINE = re.compile(
    r"(?<![\w(])(" + "|".join(re.escape(label) for label in _LITERT_LABELS) + r"):\s+(\S+)(?:[^(]*\((\d+) runs\))?"
)


def parse_benchmark_litert_model(text: str) -> dict:
    """A ``benchmark_litert_model`` (C++) or ``litert-benchmark`` (Python) log, read by label.

    Also returns the stats lines the C++ tool's run loops print (``stats``, ``warmup``,
    ``inference``), which carry the median where the summary does not.
    """
    out: dict = {key: None for key in _LITERT_LABELS.values()}
    out.update({"warmup_runs": None, "runs": None})
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if "Inference timings in us" in line or parse_stats_line(line) is not None:
            continue  # benchmark_model's own summary and stats lines: read below
        m = _LITERT_LINE.search(line)
        if not m:
            continue
        label, value, runs = m.groups()
        key = _LITERT_LABELS[label]
        if key == "fully_accelerated":
            out[key] = value.lower() in ("true", "1", "yes")
            continue
        try:
            out[key] = _opt(value)
        except ValueError:
            continue
        if runs is not None:
            out["warmup_runs" if label.startswith("Warmup") else "runs"] = int(runs)
    tflite = parse_benchmark_model(text)
    out["stats"], out["warmup"], out["inference"] = tflite["stats"], tflite["warmup"], tflite["inference"]
    out["errors"] = tflite["errors"]
    return out
