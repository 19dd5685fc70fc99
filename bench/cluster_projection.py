"""Project a Table 1 run's wall time onto a Ray cluster of N nodes, from the minutes it measured.

    python bench/cluster_projection.py [--report docs/table1/table1.json] [--nodes 1 4 16 64]
                                       [--overhead 30] [--bandwidth-gbps 1]

Each point of the report is a task: its fine-tuning seconds, plus its pretraining seconds when it is
the first point of its pretraining configuration (the others wait for that one and restore its
layers, as `--backend ray` does), plus a fixed overhead per point (clone, `dvc exp run --pull`
bookkeeping, the pushes; measured by tests/test_cluster.py's points) and the transfer of the
layers' codes through the DVC remote (pushed once per configuration, pulled once per other point of
it) at the remote's bandwidth. The grid, then each round past its edges (each decided by the
results before it), are list-scheduled one after the other, longest first among those ready, on
N nodes running one point each (the seconds were measured one thread per point). Printed per N:
the projected wall time, the speed-up over one node, the wall time if every point trained its own
layers (no cache shared between nodes), the critical path (per round, the longest
configuration: its pretraining and its longest fine-tuning), and what the shared services carry:
MLflow runs logged per minute, GB through the DVC remote, and the bandwidth that keeps the
transfers under a tenth of the wall time.
"""

import argparse
import heapq
import json
from collections import defaultdict
from pathlib import Path

CODES_GB = 0.74  # the three layers' codes of a 62,000-example benchmark, float32, 3 x 1000 units


def tasks_of(points: list[dict], overhead: float, transfer: float, shared: bool = True) -> list[dict]:
    """One task per point; the first of each pretraining configuration trains it, the rest wait on
    it (``shared``), or every point trains its own layers (no cache shared between nodes)."""
    if not shared:
        return [{"id": i, "after": None, "configuration": i, "seconds": p["pretrain_seconds"] + p["finetune_seconds"] + overhead}
                for i, p in enumerate(points)]
    by_configuration = defaultdict(list)
    for point in points:
        by_configuration[(point["dataset"], point["nu"], point["pretrain_epochs"], point["pretrain_lr"])].append(point)
    tasks = []
    for configuration, mine in by_configuration.items():
        first, *rest = sorted(mine, key=lambda p: -p["finetune_seconds"])
        tasks.append({"id": len(tasks), "after": None, "configuration": configuration,
                      "seconds": first["pretrain_seconds"] + first["finetune_seconds"] + overhead + transfer})
        head = tasks[-1]["id"]
        tasks += [{"id": len(tasks) + i, "after": head, "configuration": configuration,
                   "seconds": p["finetune_seconds"] + overhead + transfer} for i, p in enumerate(rest)]
    return tasks


def schedule_rounds(points: list[dict], nodes: int, overhead: float, transfer: float, shared: bool = True) -> float:
    """Wall time of the grid, then of each round past its edges: a round starts once the one before
    it is done (it is decided by their results)."""
    rounds = sorted({p.get("round", 0) for p in points})
    return sum(schedule(tasks_of([p for p in points if p.get("round", 0) == r], overhead, transfer, shared), nodes) for r in rounds)


def schedule(tasks: list[dict], nodes: int) -> float:
    """Wall time of list scheduling: whenever a node is free, the longest ready task starts on it."""
    waiting = defaultdict(list)
    ready = []
    for task in tasks:
        if task["after"] is None:
            heapq.heappush(ready, (-task["seconds"], task["id"]))
        else:
            waiting[task["after"]].append(task)
    running, now, free = [], 0.0, nodes
    while ready or running:
        while ready and free:
            seconds, task_id = heapq.heappop(ready)
            heapq.heappush(running, (now - seconds, task_id))
            free -= 1
        now, done = heapq.heappop(running)
        free += 1
        for task in waiting.pop(done, []):
            heapq.heappush(ready, (-task["seconds"], task["id"]))
    return now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, default=Path("docs/table1/table1.json"), help="a Table 1 report (default: %(default)s)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 16, 64], help="cluster sizes (default: %(default)s)")
    parser.add_argument("--overhead", type=float, default=30.0, help="seconds a point spends outside its stages on a node (default: %(default)s)")
    parser.add_argument("--bandwidth-gbps", type=float, default=1.0, help="the DVC remote's bandwidth per transfer, Gbit/s (default: %(default)s)")
    args = parser.parse_args()

    report = json.loads(args.report.read_text())
    points = report["points"]
    transfer = CODES_GB * 8 / args.bandwidth_gbps
    tasks = tasks_of(points, args.overhead, transfer)
    configurations = {task["configuration"] for task in tasks}
    critical = 0.0  # per round, the longest configuration: its first point, then its longest other point
    for r in sorted({p.get("round", 0) for p in points}):
        mine = tasks_of([p for p in points if p.get("round", 0) == r], args.overhead, transfer)
        critical += max(sum(t["seconds"] for t in mine if t["configuration"] == c and t["after"] is None)
                        + max([t["seconds"] for t in mine if t["configuration"] == c and t["after"] is not None], default=0)
                        for c in {t["configuration"] for t in mine})
    moved_gb = CODES_GB * len(tasks)  # each configuration pushed once, pulled by each other point of it
    pretraining = {(p["dataset"], p["nu"], p["pretrain_epochs"], p["pretrain_lr"]): p["pretrain_seconds"] for p in points}
    compute = sum(pretraining.values()) + sum(p["finetune_seconds"] for p in points)
    print(f"{args.report}: {len(points)} points, {len(configurations)} pretraining configurations, {compute / 60:.0f} min of "
          f"training on one thread; overhead {args.overhead:g} s per point, {transfer:.0f} s per transfer of {CODES_GB} GB at "
          f"{args.bandwidth_gbps:g} Gbit/s")
    print("| nodes | projected wall time (min) | speed-up | without shared layers (min) | critical path (min) | MLflow runs / min | "
          "DVC remote GB | Gbit/s for transfers < 10% |")
    print("|---|---|---|---|---|---|---|---|")
    one = schedule_rounds(points, 1, args.overhead, transfer)
    for nodes in args.nodes:
        wall = schedule_rounds(points, nodes, args.overhead, transfer)
        needed = moved_gb * 8 / (0.1 * wall) if wall else 0
        print(f"| {nodes} | {wall / 60:.1f} | {one / wall:.1f} | {schedule_rounds(points, nodes, args.overhead, 0.0, shared=False) / 60:.1f} | {critical / 60:.1f} | "
              f"{len(points) / (wall / 60):.1f} | "
              f"{moved_gb:.0f} | {needed:.2f} |")


if __name__ == "__main__":
    main()
