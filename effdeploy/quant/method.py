"""The calibrate stage: a quantization method (observers + registered passes) and the
simulation it produces. The baseline (min-max, round-to-nearest) and ours are two ``Method``s."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from effdeploy.config import RunConfig, parse_precision
from effdeploy.quant.sim import QuantSim


@dataclass(frozen=True)
class Method:
    """A way to quantize: its observers, the registered passes it runs (``quant.registry``), and
    the pass options that distinguish two runs of the same passes."""

    name: str
    observer: str
    weight_observer: str
    passes: tuple[str, ...] = ()
    range_search_objective: str = "relative"
    adaround_balance: bool = False
    saturate_sigmoid_inputs: bool = False

    def __getattr__(self, name: str):
        # ``method.adaround`` etc.: whether a registered pass of that name runs
        from effdeploy.quant.registry import all_passes

        if name in {p.name for p in all_passes()}:
            return name in self.passes
        raise AttributeError(name)

    def to_dict(self) -> dict:
        """The report's ``method``: its fields, and one true/false key per registered pass."""
        from effdeploy.quant.registry import all_passes

        d = asdict(self)
        d.update({p.name: p.name in self.passes for p in all_passes()})
        d["passes"] = list(self.passes)
        return d


def methods_for(run: RunConfig, precision: str) -> list[Method]:
    """The baseline and our method at ``precision`` (the quant section's ``by_precision`` applied)."""
    from effdeploy.quant.registry import enabled_passes

    q = run.quant.for_precision(precision)
    weight_bits, _ = parse_precision(precision)
    return [
        Method("minmax", "minmax", "minmax"),
        Method(
            "ours",
            q.observer,
            q.weight_observer,
            passes=enabled_passes(q, weight_bits),
            range_search_objective=q.range_search_objective,
            adaround_balance=q.adaround_balance,
            saturate_sigmoid_inputs=q.saturate_sigmoid_inputs,
        ),
    ]


def new_sim(model, q, precision: str, *, saturate_sigmoid_inputs: bool) -> QuantSim:
    """An uncalibrated simulation of ``model`` at ``precision``, with the per-layer overrides of
    ``q`` (a quant section already resolved for that precision)."""
    wb, ab = parse_precision(precision)
    return QuantSim(
        model,
        weight_bits=wb,
        act_bits=ab,
        weight_overrides=[(o.pattern, o.weight_bits) for o in q.overrides],
        act_overrides=[(o.pattern, o.act_bits) for o in q.overrides],
        saturate_sigmoid_inputs=saturate_sigmoid_inputs,
    )


def run_method(model, q, method: Method, precision: str, cal_batches: list[torch.Tensor]):
    """The simulation of ``method`` at ``precision``, calibrated on ``cal_batches`` and through its
    passes in registry order. Returns the simulation and each pass's report by name."""
    from effdeploy.quant.registry import run_passes

    q = q.for_precision(precision)
    sim = new_sim(model, q, precision, saturate_sigmoid_inputs=method.saturate_sigmoid_inputs)
    sim.calibrate(cal_batches, observer=method.observer, weight_observer=method.weight_observer)
    return sim, run_passes(sim, cal_batches, q, method.passes)


def calibrated_sim(model, q, method: Method, precision: str, cal_batches: list[torch.Tensor]):
    """``run_method`` with the reports in the report's layout: the simulation, the range-search
    report (with the range-learning report as its ``"learned"``) and the AdaRound report, each
    None where its pass did not run."""
    sim, reports = run_method(model, q, method, precision, cal_batches)
    searched, ada, _ = report_layout(reports)
    return sim, searched, ada


def report_layout(reports: dict) -> tuple[dict | None, dict | None, dict]:
    """Pass reports as a report row holds them: the range-search report (the range-learning one as
    its ``"learned"``), the AdaRound report, and the reports of every other pass but bias
    correction (which reports nothing worth keeping), by name."""
    rest = {
        k: v for k, v in reports.items() if k not in ("range_search", "learn_ranges", "adaround", "bias_correction")
    }
    searched = reports.get("range_search")
    if "learn_ranges" in reports:
        searched = {**(searched or {}), "learned": reports["learn_ranges"]}
    return searched, reports.get("adaround"), rest
