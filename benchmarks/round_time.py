"""Where does a round's wall time go, and how much of it is work the user asked for?

Simulated rounds (CIFAR-10, the `cnn`, 2 scorers, dynamic AL, ``--rounds 2``: rounds 0 and 1 train, test and
score, round 2 trains and tests: round 0 pays what a process pays once, round 1 is a round in the middle of a run) through `ray_dal.loop.simulation.run_experiment` on an embedded Ray, for
each code version given with ``--tree LABEL=PATH`` (a checkout of ray_dal: "before" and "after" a change, run
alternately so a shared machine's load hits both alike). Each run is a fresh process (PYTHONPATH=PATH); after
its rounds, the same process times the same work in-process, without Ray: decode + forward of the test set,
decode + dynamic scores + top-b of round 0's unlabeled pool with round 0's model and G (torch's default
threads, i.e. the whole machine, like the embedded Ray's actors together). Reported per round, from
``metrics.json``: train, G, eval, score (eval is null where the test rode in the scoring pass), prepare and
Ray Train start-up (where the version records them), the rest; and the ratios of the targets
(benchmarks/README.md):

    overhead  = round_seconds / (train + G + eval + score)            (target <= 1.25, 50k pool)
    non-train = (eval + score) / in-process (decode + test + scoring)  (target <= 1.5, 10k pool; every scoring
                round against round 0's in-process work, whose pool is one budget larger than round 1's)

    python benchmarks/round_time.py --quick --out /tmp/x                                 # smoke run (~1 min)
    python benchmarks/round_time.py --tree after=. --pool-sizes 10000 --repeats 1        # this checkout only
    git worktree add /tmp/before <commit>
    python benchmarks/round_time.py --tree before=/tmp/before --tree after=. --workers before=2 after=auto

Writes benchmarks/results/round_time.{json,md,png} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("train", "grad", "eval", "score", "prepare", "train_startup")


# ------------------------------------------------------------------------------- one run (a child process)


def one_run(args: argparse.Namespace) -> dict:
    """Run the experiment here, then time the same test and scoring work in this process; a JSON-able dict."""
    import torch

    from ray_dal.config import load_config
    from ray_dal.loop.simulation import run_experiment

    out = Path(tempfile.mkdtemp(prefix="round_time_"))
    overrides = {"data.data_dir": args.data_dir, "data.pool_size": args.pool_size, "data.test_size": args.test_size,
                 "loop.out": str(out), "loop.rounds": args.rounds, "loop.budget": args.budget, "model.name": "cnn",
                 "scoring.num_scorers": 2, "train.num_workers": args.workers_value}
    cfg = load_config(REPO / "configs" / "cifar10.yaml", overrides)
    start = time.perf_counter()
    run_experiment(cfg)
    wall = time.perf_counter() - start
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    torch.set_num_threads(os.cpu_count() or 1)
    return {"rounds": rounds, "job_seconds": wall, "in_process": in_process_work(cfg, out),
            "torch_threads": torch.get_num_threads()}


def in_process_work(cfg, out: Path) -> dict:
    """Seconds of round 0's test (decode + forward) and scoring (decode + dynamic scores + top-b), no Ray."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from ray_dal.data import preprocess_batch, read_rows
    from ray_dal.loop.simulation import load_experiment
    from ray_dal.models import build_model
    from ray_dal.scoring import dynamic_scores, labeled_gradient
    from ray_dal.topk import top_b

    exp = load_experiment(cfg)  # the run's pool and test ids
    model = build_model("cnn", 10)
    model.load_state_dict(torch.load(out / "round_000" / "model.pt", weights_only=True))
    model.eval()
    labeled = pq.read_table(out / "round_000" / "labeled.parquet")["id"].to_numpy()

    def decode(pool, ids):
        rows = read_rows(pool, ids, ("id", "image", "label"))
        return preprocess_batch({name: rows[name].to_numpy(zero_copy_only=False) for name in rows.column_names})

    x = decode(exp.train, labeled)
    grad_sum = labeled_gradient(model, (torch.from_numpy(x["x"]), torch.from_numpy(x["label"])))
    batch_size, times, correct = cfg.scoring.batch_size, {}, 0
    start = time.perf_counter()
    for lo in range(0, len(exp.test_ids), batch_size):
        batch = decode(exp.test, exp.test_ids[lo : lo + batch_size])
        with torch.inference_mode():
            correct += int((model(torch.from_numpy(batch["x"])).argmax(1).numpy() == batch["label"]).sum())
    times["test_seconds"] = time.perf_counter() - start
    unlabeled = np.setdiff1d(exp.pool_ids, labeled)
    start = time.perf_counter()
    scores = []
    for lo in range(0, len(unlabeled), batch_size):
        batch = decode(exp.train, unlabeled[lo : lo + batch_size])
        scores.append(dynamic_scores(model, torch.from_numpy(batch["x"]), grad_sum, gamma=cfg.scoring.gamma,
                                     scope=cfg.scoring.scope).double().numpy())
    top_b(unlabeled, np.concatenate(scores), cfg.loop.budget)
    times["score_seconds"] = time.perf_counter() - start
    times.update(test_images=int(len(exp.test_ids)), pool_images=int(len(unlabeled)), test_correct=correct)
    return times


# ----------------------------------------------------------------------------------------------- parent


def summarize(run: dict) -> dict:
    """Per round: the split (seconds), the rest, and the two ratios."""
    rows = []
    for m in run["rounds"]:
        parts = {p: m.get(f"{p}_seconds") for p in PARTS}
        work = sum(parts[p] or 0.0 for p in ("train", "grad", "eval", "score"))
        known = sum(v or 0.0 for v in parts.values()) + (m.get("approximation_seconds") or 0.0)
        rows.append({"round": m["round"], "round_seconds": m["round_seconds"], **parts,
                     "approximation": m.get("approximation_seconds"), "other": m["round_seconds"] - known,
                     "train_workers": m.get("train_workers"), "test_accuracy": m["test_accuracy"],
                     "overhead_ratio": m["round_seconds"] / work})
    ip = run["in_process"]
    for row in rows:
        if row["score"] is not None:
            row["non_train_ratio"] = ((row["eval"] or 0.0) + row["score"]) / (ip["test_seconds"] + ip["score_seconds"])
    return {"rounds": rows, "job_seconds": run["job_seconds"], "in_process": ip}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", default=[], help="LABEL=PATH of a ray_dal checkout (repeatable)")
    parser.add_argument("--workers", nargs="*", default=[], help="LABEL=VALUE of train.num_workers (default auto)")
    parser.add_argument("--pool-sizes", nargs="+", type=int, default=[10_000, 50_000])
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--budget", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="queries per run (loop.rounds)")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="smoke run: a 1,000-image pool, 200 test images, "
                        "1 query, 1 repeat, this checkout only; writes round_time_quick.*")
    parser.add_argument("--one-run", type=Path, help=argparse.SUPPRESS)  # child: write one run's JSON here
    parser.add_argument("--pool-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers-value", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_run:
        value = args.workers_value
        args.workers_value = int(value) if value.isdigit() else value
        args.one_run.write_text(json.dumps(one_run(args), default=float))
        return

    sys.path.insert(0, str(REPO / "benchmarks"))
    import record

    if args.quick:
        args.pool_sizes, args.test_size, args.repeats, args.tree, args.rounds = [1000], 200, 1, [], 1
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": str(REPO)}
    workers = dict(w.split("=", 1) for w in args.workers)
    result = {"machine": record.machine_info(), "command": " ".join(["python", "benchmarks/round_time.py",
                                                                      *(argv or sys.argv[1:])]),
              "settings": {"test_size": args.test_size, "budget": args.budget, "model": "cnn", "num_scorers": 2,
                           "strategy": "dynamic", "rounds": args.rounds, "quick": args.quick},
              "trees": {label: {"path": str(Path(p).resolve()), "commit": _commit(p),
                                "num_workers": workers.get(label, "auto")} for label, p in trees.items()},
              "runs": []}
    for pool_size in args.pool_sizes:
        for repeat in range(args.repeats):
            for label, path in trees.items():  # alternate: the load of the moment hits every version alike
                run = _child(path, args, pool_size, workers.get(label, "auto"))
                result["runs"].append({"tree": label, "pool_size": pool_size, "repeat": repeat, **summarize(run)})
                r0 = result["runs"][-1]["rounds"][0]
                print(f"{label} pool {pool_size} #{repeat}: round 0 {r0['round_seconds']:.1f}s, overhead "
                      f"{r0['overhead_ratio']:.2f}, non-train {r0['non_train_ratio']:.2f}", flush=True)
    record.save(result, args.out, "round_time_quick" if args.quick else "round_time", write_markdown, plot)


def _commit(path: str) -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True)
    return out.stdout.strip() or None


def _child(tree: str, args: argparse.Namespace, pool_size: int, workers: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "run.json"
        env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one-run", str(target), "--pool-size", str(pool_size),
               "--workers-value", workers, "--test-size", str(args.test_size), "--budget", str(args.budget),
               "--rounds", str(args.rounds), "--data-dir", args.data_dir]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(target.read_text())


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def write_markdown(result: dict, path: Path) -> None:
    m = result["machine"]
    lines = ["# Round time: where a round's wall time goes (generated by benchmarks/round_time.py)", "",
             f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, load average {m['load_average_at_start']} "
             f"at start and {m['load_average_at_end']} at the end; torch {m['torch']}, Ray {m['ray']}, "
             f"{m['date_utc']}.", f"Command: `{result['command']}`", "",
             "Versions: " + "; ".join(f"**{k}** = {v['commit'] or v['path']} (train.num_workers {v['num_workers']})"
                                      for k, v in result["trees"].items()), "",
             f"Settings: {json.dumps(result['settings'])}. Seconds are medians over the repeats; eval '-' = tested in "
             "the scoring pass (its time is in score); '-' under prepare / Train start: not recorded by that version "
             "(then in 'other'). in-process = the same test + scoring work in one process without Ray.", "",
             "| version | pool | round | round s | train | G | eval | score | prepare | Train start | other | "
             "overhead ratio | in-process test + score s | non-train ratio | workers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for run in result["runs"]:
        for row in run["rounds"]:
            groups.setdefault((run["tree"], run["pool_size"], row["round"]), []).append((row, run["in_process"]))
    for (tree, pool, rnd), rows in groups.items():
        med = {k: _median([r[k] for r, _ in rows]) for k in ("round_seconds", *PARTS, "other", "overhead_ratio")}
        ntr = _median([r.get("non_train_ratio") for r, _ in rows])
        ip = _median([i["test_seconds"] + i["score_seconds"] for _, i in rows]) if ntr is not None else None
        lines.append(f"| {tree} | {pool} | {rnd} | {_fmt(med['round_seconds'])} | {_fmt(med['train'])} | "
                     f"{_fmt(med['grad'], 2)} | {_fmt(med['eval'])} | {_fmt(med['score'])} | {_fmt(med['prepare'])} | "
                     f"{_fmt(med['train_startup'])} | {_fmt(med['other'])} | {_fmt(med['overhead_ratio'], 2)} | "
                     f"{_fmt(ip)} | {_fmt(ntr, 2)} | {rows[0][0]['train_workers']} |")
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["tree"], r["pool_size"]) for r in result["runs"]}, key=lambda k: (k[1], k[0]))
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(keys) + 1.5))
    colors = dict(zip((*PARTS, "approximation", "other"), plt.cm.tab10.colors))
    for y, (tree, pool) in enumerate(keys):
        rows = [r["rounds"][0] for r in result["runs"] if (r["tree"], r["pool_size"]) == (tree, pool)]
        left = 0.0
        for part in (*PARTS, "approximation", "other"):
            width = _median([r[part] for r in rows]) or 0.0
            ax.barh(y, width, left=left, color=colors[part], label=part if y == 0 else None)
            left += width
    ax.set_yticks(range(len(keys)), [f"{t}, {p // 1000}k pool" for t, p in keys])
    ax.set_xlabel("round 0 wall seconds (median); 'other' holds what a version does not record")
    fig.legend(fontsize=7, ncol=4, loc="lower center")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
