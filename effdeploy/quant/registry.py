"""The quantization passes, in one ordered registry.

A pass is a function that improves a calibrated simulation in place (its ranges, its weight
rounding, its biases) and may return a report. It is registered once, with the rule that says
when the quant config turns it on and the words that name it in labels; the pipeline, the report
and the results tables all read this registry, so adding a pass touches one module::

    @register_pass("my_pass", order=35, label="my pass", enabled=lambda q, wb: q.some_flag)
    def my_pass(sim, batches, q):
        ...
        return {"what": "it did"}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from effdeploy.errors import EffdeployError


@dataclass(frozen=True)
class QuantPass:
    name: str  # the report key
    order: int  # passes run in ascending order
    apply: Callable[..., Any]  # apply(sim, calibration_batches, quant_config) -> report or None
    enabled: Callable[..., bool]  # enabled(quant_config_for_precision, weight_bits) -> bool
    label: str | None = None  # named in method labels and result names; None: always implied


_PASSES: dict[str, QuantPass] = {}


def register_pass(name: str, *, order: int, enabled: Callable[..., bool], label: str | None = None):
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _PASSES[name] = QuantPass(name, order, fn, enabled, label)
        return fn

    return deco


def unregister_pass(name: str) -> None:
    _PASSES.pop(name, None)


def _load_builtin() -> None:
    import effdeploy.quant.block_reconstruction  # noqa: F401
    import effdeploy.quant.passes  # noqa: F401  (registers the built-in passes)


def all_passes() -> list[QuantPass]:
    _load_builtin()
    return sorted(_PASSES.values(), key=lambda p: (p.order, p.name))


def get_pass(name: str) -> QuantPass:
    _load_builtin()
    if name not in _PASSES:
        raise EffdeployError(f"unknown quantization pass {name!r} (registered: {', '.join(_PASSES)})")
    return _PASSES[name]


def enabled_passes(q, weight_bits: int) -> tuple[str, ...]:
    """The names of the passes ``q`` (already resolved for its precision) turns on, in order."""
    return tuple(p.name for p in all_passes() if p.enabled(q, weight_bits))


def run_passes(sim, batches, q, names) -> dict[str, Any]:
    """Apply the named passes to ``sim`` in registry order; their reports by name."""
    ordered = sorted((get_pass(n) for n in names), key=lambda p: (p.order, p.name))
    return {p.name: p.apply(sim, batches, q) for p in ordered}


def pass_labels(names) -> list[str]:
    """The label words of the named passes that have one, in registry order."""
    by_name = {p.name: p for p in all_passes()}
    known = sorted((by_name[n] for n in names if n in by_name), key=lambda p: (p.order, p.name))
    return [p.label for p in known if p.label]


def passes_of(method: dict) -> list[str]:
    """The passes a report row's method ran: its ``passes`` list, or for rows written before that
    list existed, every registered pass whose name is a true key of the method."""
    if "passes" in method:
        return list(method["passes"])
    return [p.name for p in all_passes() if method.get(p.name)]
