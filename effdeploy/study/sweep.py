"""Run sweep cells that are not cached yet: one after another, in a local process pool
(``jobs``), or on an existing Ray cluster (``ray_address``).

Cells are independent quantization runs. Each writes into a temporary directory beside its final
one and is renamed into place when it succeeds, so an interrupted sweep leaves no half cell. A
failing cell is recorded with its one-line reason (its log kept under ``<root>/logs/``); the
others continue. Workers run torch on one thread each: ``jobs`` workers use ``jobs`` cores.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from effdeploy.errors import EffdeployError
from effdeploy.study.cache import (
    CELL_FILE,
    KEY_CHARS,
    Cell,
    MissingInput,
    cell_dir,
    cell_inputs,
    cell_key,
    cells_root,
    is_done,
    resolve_run,
)

RAY_HINT = "pip install 'effdeploy[ray]'"


@dataclass
class CellOutcome:
    label: str
    status: str  # "cached" | "ran" | "skipped" | "failed" ("pending" only while the sweep runs)
    key: str | None = None
    dir: str | None = None  # the finished cell's directory
    reason: str = ""  # why skipped or failed, one line
    seconds: float | None = None  # how long it ran (not part of any report: runs vary)

    @property
    def ok(self) -> bool:
        return self.status in ("cached", "ran")

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_cell(run, out_dir: Path, log) -> None:
    """The real cell: ``effdeploy quantize`` of the run into ``out_dir``."""
    from effdeploy.quant.pipeline import quantize_run

    quantize_run(run, out_dir, log=log)


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def execute_cell(
    cell_fn, run, root: str, key: str, inputs: dict, cwd: str | None = None, threads=None, echo=None
) -> dict:
    """Run one cell into a temporary directory, then rename it to its key's directory. The cell's
    log goes to ``<root>/logs/<key>.log`` (and to ``echo`` too, when given). Never raises for a
    failing cell: returns {"status": "ran" | "failed", "reason", "seconds"}."""
    if cwd is not None and os.path.isdir(cwd):
        os.chdir(cwd)  # a Ray worker starts elsewhere; configs hold paths relative to the tree
    _set_threads(threads)
    final = cell_dir(root, key)
    tmp = cells_root(root) / f".{key[:KEY_CHARS]}.{os.getpid()}.tmp"
    logs = Path(root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(logs / f"{key[:KEY_CHARS]}.log", "w") as log_file:

        def log(msg: str) -> None:
            print(msg, file=log_file, flush=True)
            if echo is not None:
                echo(msg)

        try:
            cell_fn(run, tmp, log)
            (tmp / CELL_FILE).write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str) + "\n")
            if not final.exists():  # else another sweep finished the same cell meanwhile: keep its copy
                os.replace(tmp, final)
            status, reason = "ran", ""
        except Exception as err:  # noqa: BLE001 -- a failing cell must not stop the sweep
            log(traceback.format_exc())
            status, reason = "failed", one_line(err)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"status": status, "reason": reason, "seconds": round(time.perf_counter() - t0, 1)}


def _init_worker(threads: int, verbose: bool = False) -> None:
    from effdeploy.quiet import quiet_third_party

    quiet_third_party(verbose)  # a worker is a fresh process: quiet it as the CLI quiets itself
    _set_threads(threads)


def _eta(done: int, total: int, elapsed: float) -> str:
    if done == 0 or done >= total:
        return "-"
    left = elapsed / done * (total - done)
    return f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"


def run_cells(
    cells: Iterable[Cell],
    root: str | Path,
    *,
    jobs: int = 1,
    ray_address: str | None = None,
    cell_fn: Callable | None = None,
    selected: Callable[[Cell], bool] | None = None,
    log=print,
) -> list[CellOutcome]:
    """Every cell's outcome, in the order given. Cells whose key is cached are not run; cells
    with a missing input, or not ``selected``, are skipped with a reason."""
    if jobs < 1:
        raise EffdeployError(f"--jobs: must be at least 1 (got {jobs})")
    if ray_address:
        import_ray()  # before hashing anything: a missing Ray is the first thing to say
    cell_fn = cell_fn or quantize_cell
    root = Path(root)
    outcomes: list[CellOutcome] = []
    pending: dict[str, _Job] = {}  # by key: the same inputs twice run once
    for cell in cells:
        try:
            run = resolve_run(cell)
            inputs = cell_inputs(cell, run)
        except MissingInput as err:
            outcomes.append(CellOutcome(cell.label, "skipped", reason=str(err)))
            continue
        key = cell_key(inputs)
        out = CellOutcome(cell.label, "cached", key=key, dir=str(cell_dir(root, key)))
        outcomes.append(out)
        if is_done(root, key):
            continue
        if selected is not None and not selected(cell):
            out.status, out.dir, out.reason = "skipped", None, "not selected (--only)"
            continue
        out.status = "pending"
        if key in pending:
            pending[key].also.append(len(outcomes) - 1)
        else:
            pending[key] = _Job(len(outcomes) - 1, cell.label, run, key, inputs)

    if pending:
        jobs_list = list(pending.values())
        where = f"Ray cluster {ray_address}" if ray_address else f"{jobs} processes" if jobs > 1 else "this process"
        cached = sum(o.status == "cached" for o in outcomes)
        log(f"sweep: {len(jobs_list)} cell(s) to run in {where}; {cached} cached")
        runner = _run_ray if ray_address else _run_pool if jobs > 1 else _run_serial
        for job, result in _report_progress(jobs_list, runner(jobs_list, root, cell_fn, jobs, ray_address, log), log):
            for i in (job.index, *job.also):
                out = outcomes[i]
                out.status, out.reason, out.seconds = result["status"], result["reason"], result["seconds"]
                if out.status == "failed":
                    out.dir = None
    return outcomes


@dataclass
class _Job:
    index: int
    label: str
    run: object
    key: str
    inputs: dict
    also: list = field(default_factory=list)  # outcomes of cells with the same key


def _report_progress(jobs, results_iter, log):
    """Log each finished cell with an ETA; yield (job, result)."""
    from effdeploy.progress import progress

    total, t0 = len(jobs), time.monotonic()
    bar = progress(results_iter, desc="cells", unit="cell", total=total)
    for done, (job, result) in enumerate(bar, start=1):
        eta = _eta(done, total, time.monotonic() - t0)
        bar.set_postfix(eta=eta)
        what = "done" if result["status"] == "ran" else f"FAILED: {result['reason']}"
        log(f"  cell {done}/{total} {job.label}: {what} ({result['seconds']:.0f} s); ETA {eta}")
        yield job, result


def _run_serial(jobs, root, cell_fn, n_jobs, ray_address, echo):
    cwd = os.getcwd()
    for job in jobs:
        yield job, execute_cell(cell_fn, job.run, str(root), job.key, job.inputs, cwd, echo=echo)


def _run_pool(jobs, root, cell_fn, n_jobs, ray_address, echo):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    cwd = os.getcwd()
    # spawn: a forked copy of a process that has used torch's thread pool can hang in OpenMP
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=n_jobs,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(1, os.environ.get("EFFDEPLOY_VERBOSE", "") == "1"),
    ) as pool:
        futures = {pool.submit(execute_cell, cell_fn, j.run, str(root), j.key, j.inputs, cwd): j for j in jobs}
        for fut in as_completed(futures):
            try:
                yield futures[fut], fut.result()
            except Exception as err:  # noqa: BLE001 -- a worker that died (killed, out of memory)
                yield futures[fut], {"status": "failed", "reason": one_line(err), "seconds": 0.0}


def import_ray():
    """Ray, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise EffdeployError(f"ray_address given but Ray is not installed: {RAY_HINT}") from None
    return ray


def _run_ray(jobs, root, cell_fn, n_jobs, ray_address, echo):
    """Send the cells to an existing cluster. Its workers must see this tree at the same path
    (a shared filesystem): cells read checkpoints and write results by path."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=ray_address, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(execute_cell)
    cwd, root = os.getcwd(), str(Path(root).resolve())
    refs = {remote.remote(cell_fn, j.run, root, j.key, j.inputs, cwd, 1): j for j in jobs}
    waiting = list(refs)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        for ref in ready:
            try:
                yield refs[ref], ray.get(ref)
            except Exception as err:  # noqa: BLE001 -- a worker lost by the cluster
                yield refs[ref], {"status": "failed", "reason": one_line(err), "seconds": 0.0}
