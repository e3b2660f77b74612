"""The subset approximation ratio R(Q|S) over training: the paper's Figure 4, measured with ray_dal's scorer.

Dynamic AL queries the top-b samples by their own score instead of maximising the change of training
dynamics Δ(Q|S) of a whole query (Section 3, Eq. 12-14). R(Q|S) = Σ_{x∈Q} score(x) / Δ(Q|S) says how good
that approximation is; the paper reports E_{Q~U} R(Q|S) -> 1 as the model converges. This script

1. trains the `cnn` in-process (no Ray) on a seeded labeled set S of M real CIFAR-10 training images
   (Adam lr 1e-3, batch 128, mean CE, as configs/cifar10.yaml), epoch by epoch, until training accuracy
   (eval mode, on S) reaches 0.99 and then on to --max-epochs;
2. at checkpoint epochs (0, 1, 2, 5, 10, 20, ..., the convergence epoch) computes G_S and each pool sample's
   ||g_x||² and <g_x, G_S> once (`dynamic_scores` with γ = 0 and γ = inf), per scope;
3. for b in --budgets: R of --draws uniformly random size-b subsets of a seeded unlabeled pool of N other
   training images (the same subsets at every checkpoint; G_Q from `query_gradient`, Δ from
   `change_of_dynamics`), mean ± std, and R of the top-b query by score (γ = 2, ties to the smaller id);
4. checks the cached-term ratios against `approximation_ratio` itself on the top-b query and times it.

Writes benchmarks/results/approximation_ratio.{json,md,png}.

    python benchmarks/approximation_ratio.py --quick --out /tmp/x   # smoke run (~30 s)
    python benchmarks/approximation_ratio.py                        # ~10 min on the 2-core VM
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import record  # benchmarks/record.py
import torch
import torch.nn.functional as F

from ray_dal.data import decode_images, normalize
from ray_dal.models import build_model
from ray_dal.scoring import approximation_ratio, dynamic_scores, labeled_gradient
from ray_dal.scoring.approximation import ApproximationRatio, change_of_dynamics, query_gradient
from ray_dal.topk import top_b_rows

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"  # --data-dir
SCHEDULE = (0, 1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 120, 150, 200)
SCORE_BATCH = 256
PAPER_CLAIM = (
    "Section 3: \"As shown in Figure 4, the expectation E_{Q~U} R(Q|S) -> 1 when the model is converged. "
    "Therefore, the approximated result delivered by the greedy algorithm is close to the global optimal "
    "solution of the original maximization problem, Equation (10), especially when the model is converged.\" "
    "Section 5: \"under different settings the expected approximation ratio always converges to 1 with the "
    "increase of training epochs\". Figure 4 shows CIFAR-10 + ResNet (and a second data set and network) for "
    "b = 250, 500, 1000 over training epochs; the paper gives no R values in its text."
)


def load_split(data_dir: Path, m: int, n: int, seed: int):
    """Seeded disjoint S (m images, labels) and pool U (n images) from train.parquet, float32 normalised."""
    table = pq.read_table(data_dir / "train.parquet", columns=["image", "label"])
    rows = np.random.default_rng(seed).permutation(table.num_rows)[: m + n]
    part = table.take(rows)
    x = normalize(decode_images(part["image"].to_pylist())[0])
    y = torch.tensor(part["label"].to_pylist())
    return x[:m], y[:m], x[m:], rows[m:]


def train_epoch(model, optimizer, x, y, batch_size: int, gen: torch.Generator) -> None:
    model.train()
    for idx in torch.randperm(x.shape[0], generator=gen).split(batch_size):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def fit_state(model, x, y) -> tuple[float, float]:
    """(accuracy, mean CE) on (x, y), eval mode."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def pool_terms(model, x_pool, G, scope) -> tuple[np.ndarray, np.ndarray]:
    """float64 [N] ||g_x||² and <g_x, G> of every pool sample."""
    chunks = x_pool.split(SCORE_BATCH)
    sq = torch.cat([dynamic_scores(model, c, None, gamma=0.0, scope=scope) for c in chunks])
    dot = torch.cat([dynamic_scores(model, c, G, gamma=float("inf"), scope=scope) for c in chunks])
    return sq.double().numpy(), dot.double().numpy()


def subset_ratio(model, x_pool, idx, sq, dot, G, zeros, scope) -> dict:
    """R of the pool rows ``idx`` from the cached per-sample terms and G_Q, with Δ's parts."""
    G_Q = query_gradient(model, x_pool[torch.from_numpy(idx)], scope, SCORE_BATCH)
    r = ApproximationRatio.of(float((sq[idx] + 2 * dot[idx]).sum()), change_of_dynamics(G_Q, G), len(idx))
    # R - 1 = (Σ||g||² - ||G_Q||²) / Δ: the cross terms Σ_{x≠x'} <g_x, g_x'> are what R measures
    return {"ratio": r.ratio, "numerator": r.numerator, "delta": r.delta,
            "sum_sq_norms": float(sq[idx].sum()), "gq_sq_norm": change_of_dynamics(G_Q, zeros)}


def checkpoint(model, epoch, x_s, y_s, x_pool, pool_ids, draws, args) -> dict:
    """Every measurement at one epoch: fit on S, then per scope G_S, the pool's terms and R per budget."""
    acc, loss = fit_state(model, x_s, y_s)
    row = {"epoch": epoch, "train_accuracy": acc, "train_loss": loss, "scopes": {}}
    for scope in args.scopes:
        G = labeled_gradient(model, (x_s, y_s), scope=scope)
        zeros = {n: torch.zeros_like(t) for n, t in G.items()}
        sq, dot = pool_terms(model, x_pool, G, scope)
        score = sq + 2 * dot
        cell = {"gs_sq_norm": change_of_dynamics(G, zeros), "pool_mean_sq_norm": float(sq.mean()),
                "pool_mean_dot": float(dot.mean()), "budgets": {}}
        for b in args.budgets:
            rand = [subset_ratio(model, x_pool, d, sq, dot, G, zeros, scope) for d in draws[b]]
            ratios = [r["ratio"] for r in rand]
            cell["budgets"][str(b)] = {
                "random_mean": statistics.fmean(ratios),
                "random_std": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                "top": subset_ratio(model, x_pool, top_b_rows(pool_ids, score, b), sq, dot, G, zeros, scope),
                "random": rand,
            }
        if scope == "all":
            cell["direct_check"] = direct_check(model, x_pool, G, pool_ids, score, cell, args.budgets[0])
        row["scopes"][scope] = cell
        print(f"epoch {epoch:3d} acc {acc:.3f} loss {loss:.3f} [{scope}] " + "  ".join(
            f"b={b}: random {c['random_mean']:.3f}±{c['random_std']:.3f} top {c['top']['ratio']:.3f}"
            for b, c in cell["budgets"].items()), flush=True)
    return row


def direct_check(model, x_pool, G, pool_ids, score, cell, b, repeats: int = 3) -> dict:
    """`approximation_ratio` itself on the top-b query (scope all): its agreement with the cached-term
    ratio, and its wall time against one `dynamic_scores` pass over the same b samples (medians)."""
    x_q = x_pool[torch.from_numpy(top_b_rows(pool_ids, score, b))]
    times = {"approximation_ratio": [], "dynamic_scores": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = approximation_ratio(model, x_q, G, "all", SCORE_BATCH)
        t1 = time.perf_counter()
        for chunk in x_q.split(SCORE_BATCH):
            dynamic_scores(model, chunk, G, gamma=2.0)
        times["approximation_ratio"].append(t1 - t0)
        times["dynamic_scores"].append(time.perf_counter() - t1)
    med = {k: statistics.median(v) for k, v in times.items()}
    cached = cell["budgets"][str(b)]["top"]["ratio"]
    return {"b": b, "ratio": r.ratio, "rel_diff_vs_cached": abs(r.ratio - cached) / abs(cached), "seconds": med,
            "over_dynamic_scores": med["approximation_ratio"] / med["dynamic_scores"]}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    result = {"machine": record.machine_info(torch_threads=torch.get_num_threads()),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "paper_claim": PAPER_CLAIM, "checkpoints": []}
    t_start = time.perf_counter()
    x_s, y_s, x_pool, pool_ids = load_split(args.data_dir, args.initial, args.pool, args.seed)
    rng = np.random.default_rng(args.seed + 1)  # the same random queries at every checkpoint
    draws = {b: [np.sort(rng.choice(len(pool_ids), b, replace=False)) for _ in range(args.draws)]
             for b in args.budgets}
    torch.manual_seed(args.seed)
    model = build_model("cnn", 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    converged = None
    for epoch in range(args.max_epochs + 1):
        if epoch:
            train_epoch(model, optimizer, x_s, y_s, args.batch_size, gen)
        first = converged is None and fit_state(model, x_s, y_s)[0] >= args.train_accuracy
        converged = epoch if first else converged
        if epoch in SCHEDULE or first or epoch == args.max_epochs:
            result["checkpoints"].append(checkpoint(model, epoch, x_s, y_s, x_pool, pool_ids, draws, args))
    result["converged_epoch"] = converged
    result["wall_seconds"] = time.perf_counter() - t_start
    result["findings"] = findings(result)
    return result


def _at(result, epoch) -> dict:
    return next(c for c in result["checkpoints"] if c["epoch"] == epoch)


def summary(c) -> dict:
    """One budget's random queries at one checkpoint: median and quartiles of R (R is heavy-tailed where Δ
    nears 0), how many queries have Δ < 0, and the means of ρ = Σ||g||² / ||G_Q||² and c = 2<G_Q, G_S> / ||G_Q||²
    (R = (ρ + c) / (1 + c)); ``top_rho``, ``top_c``: the top-b query's."""
    q1, median, q3 = np.percentile([q["ratio"] for q in c["random"]], [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3),
            "negative_delta": sum(q["delta"] < 0 for q in c["random"]),
            "rho": statistics.fmean(map(_rho, c["random"])), "c": statistics.fmean(map(_c, c["random"])),
            "top_rho": _rho(c["top"]), "top_c": _c(c["top"])}


def _rho(query: dict) -> float:
    return query["sum_sq_norms"] / query["gq_sq_norm"]


def _c(query: dict) -> float:
    return (query["delta"] - query["gq_sq_norm"]) / query["gq_sq_norm"]


def _budget(cp, scope, b) -> dict:
    return cp["scopes"][scope]["budgets"][str(b)]


def findings(result) -> list[str]:
    """Sentences generated from the measurements (no number here is typed in by hand)."""
    s, cps, conv = result["settings"], result["checkpoints"], result["converged_epoch"]
    first, last = cps[0], cps[-1]
    out = [f"Training accuracy on S reached {s['train_accuracy']} at epoch {conv}; "
           f"measured up to epoch {last['epoch']}."
           if conv is not None else
           f"Training accuracy on S did not reach {s['train_accuracy']} within {last['epoch']} epochs "
           f"(last: {last['train_accuracy']:.3f})."]
    marks = [first] + ([_at(result, conv)] if conv is not None and conv != first["epoch"] else []) + \
        ([last] if last["epoch"] not in (first["epoch"], conv) else [])
    for scope in s["scopes"]:
        for b in s["budgets"]:
            at = "; ".join(
                f"epoch {cp['epoch']}: mean {_budget(cp, scope, b)['random_mean']:.3f} ± "
                f"{_budget(cp, scope, b)['random_std']:.3f}, median {summary(_budget(cp, scope, b))['median']:.3f}, "
                f"ρ {summary(_budget(cp, scope, b))['rho']:.3f}, top-b {_budget(cp, scope, b)['top']['ratio']:.3f}"
                for cp in marks)
            medians = [abs(summary(_budget(cp, scope, b))["median"] - 1) for cp in cps]
            tops = [_budget(cp, scope, b)["top"]["ratio"] for cp in cps]
            negative = sum(summary(_budget(cp, scope, b))["negative_delta"] for cp in cps)
            out.append(f"[{scope}] b = {b}, {s['draws']} random queries: {at}. The median is closest to 1 at epoch "
                       f"{cps[int(np.argmin(medians))]['epoch']}; Δ < 0 in {negative} of {s['draws'] * len(cps)} "
                       f"random queries over all checkpoints; the top-b query's R stays in "
                       f"[{min(tops):.3f}, {max(tops):.3f}].")
    checks = [cp["scopes"]["all"]["direct_check"] for cp in cps if "all" in cp["scopes"]]
    if checks:
        secs = statistics.median(c["seconds"]["approximation_ratio"] for c in checks)
        over = statistics.median(c["over_dynamic_scores"] for c in checks)
        out.append(f"approximation_ratio(model, top-{checks[0]['b']} query, G_S, scope='all') agrees with the "
                   f"cached-term ratio to {max(c['rel_diff_vs_cached'] for c in checks):.1e} "
                   "(relative, worst checkpoint) "
                   f"and takes {secs:.3f} s (median over checkpoints), {over:.2f}x one dynamic_scores pass over "
                   f"the same samples, at {result['machine']['torch_threads']} torch threads.")
    return out


def write_markdown(result, path: Path) -> None:
    s, m = result["settings"], result["machine"]
    lines = [
        "# Subset approximation ratio R(Q|S) over training (generated by benchmarks/approximation_ratio.py)", "",
        f"{m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} ({m['torch_threads']} threads); "
        f"{m['date_utc']}, commit {(m['git_commit'] or '?')[:8]}{' (ray_dal modified)' if m['ray_dal_dirty'] else ''}; "
        f"load average at start/end {m['load_average_at_start']} / {m['load_average_at_end']} (shared machine); "
        f"wall time {result['wall_seconds']:.0f} s.", "",
        f"cnn trained in-process on S = {s['initial']} seeded real CIFAR-10 training images (seed {s['seed']}; Adam lr "
        f"{s['lr']}, batch {s['batch_size']}, mean CE, no augmentation); unlabeled pool U = {s['pool']} other training "
        f"images; R(Q|S) = Σ_x (||g_x||² + 2<g_x, G_S>) / (||G_Q||² + 2<G_Q, G_S>), pseudo labels, eval mode, "
        f"reduction='sum'. Random: {s['draws']} uniform size-b subsets of U (the same subsets at every epoch); "
        "top-b: the query dynamic AL would make (γ = 2).", "",
        "## The paper's claim", "", result["paper_claim"], "",
        "## Measured", "", *[f"- {f}" for f in result["findings"]], "",
        "Reading R: with ρ = Σ_x ||g_x||² / ||G_Q||² and c = 2<G_Q, G_S> / ||G_Q||², R = (ρ + c) / (1 + c), so "
        "R = 1 iff ρ = 1 (the cross terms Σ_{x≠x'} <g_x, g_x'> cancel) and R = ρ when G_S = 0. ρ < 1: the "
        "query's gradients point the same way and the summed scores undercount Δ. Where c nears -1, Δ nears 0 and "
        "R of single queries explodes in either sign: hence the median and quartiles beside mean ± std.", "",
    ]
    for scope in s["scopes"]:
        head = " | ".join(f"b={b} random mean ± std | median [q1, q3] | top" for b in s["budgets"])
        lines += [f"## scope = {scope}", "",
                  f"| epoch | train acc | train loss | ‖G_S‖² | {head} |",
                  "|---|---|---|---|" + "---|---|---|" * len(s["budgets"])]
        for cp in result["checkpoints"]:
            cells = []
            for b in s["budgets"]:
                c, sm = _budget(cp, scope, b), summary(_budget(cp, scope, b))
                cells.append(f"{c['random_mean']:.3f} ± {c['random_std']:.3f} | {sm['median']:.3f} "
                             f"[{sm['q1']:.3f}, {sm['q3']:.3f}] | {c['top']['ratio']:.3f}")
            mark = " (converged)" if cp["epoch"] == result["converged_epoch"] else ""
            lines.append(f"| {cp['epoch']}{mark} | {cp['train_accuracy']:.3f} | {cp['train_loss']:.3f} | "
                         f"{cp['scopes'][scope]['gs_sq_norm']:.3g} | " + " | ".join(cells) + " |")
        lines += ["", f"ρ and c: means over the random queries (the top-b query's in brackets); Δ<0: random queries "
                  f"with Δ < 0 (of {s['draws']}). scope = {scope}:", "",
                  "| epoch | " + " | ".join(f"b={b} ρ | c | Δ<0" for b in s["budgets"]) + " |",
                  "|---|" + "---|---|---|" * len(s["budgets"])]
        for cp in result["checkpoints"]:
            cells = []
            for b in s["budgets"]:
                sm = summary(_budget(cp, scope, b))
                cells.append(f"{sm['rho']:.3f} ({sm['top_rho']:.3f}) | {sm['c']:.3f} ({sm['top_c']:.3f}) | "
                             f"{sm['negative_delta']}")
            lines.append(f"| {cp['epoch']} | " + " | ".join(cells) + " |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def write_plot(result, path: Path) -> None:
    """Row 1: random queries' mean ± std (the paper's E R; y clipped), row 2: their median and quartiles;
    top-b dashed in both; one column per scope, one colour per b."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    fig, axes = plt.subplots(2, len(s["scopes"]), figsize=(6 * len(s["scopes"]), 8), squeeze=False)
    epochs = [cp["epoch"] for cp in result["checkpoints"]]
    for col, scope in enumerate(s["scopes"]):
        for i, b in enumerate(s["budgets"]):
            cells = [_budget(cp, scope, b) for cp in result["checkpoints"]]
            sums = [summary(c) for c in cells]
            mean, std = np.array([c["random_mean"] for c in cells]), np.array([c["random_std"] for c in cells])
            bands = [(mean, mean - std, mean + std, "mean ± std"),
                     tuple(np.array([sm[k] for sm in sums]) for k in ("median", "q1", "q3")) + ("median, q1-q3",)]
            for ax, (mid, lo, hi, what) in zip(axes[:, col], bands):
                ax.plot(epochs, mid, "-o", ms=3, color=f"C{i}", label=f"b={b} random: {what}")
                ax.fill_between(epochs, lo, hi, color=f"C{i}", alpha=0.2)
                ax.plot(epochs, [c["top"]["ratio"] for c in cells], "--s", ms=3, color=f"C{i}", label=f"b={b} top-b")
        for row, ax in enumerate(axes[:, col]):
            ax.axhline(1.0, color="grey", lw=0.8)
            if result["converged_epoch"] is not None:
                ax.axvline(result["converged_epoch"], color="k", ls=":", lw=0.8,
                           label=f"train acc ≥ {s['train_accuracy']}")
            ax.set_ylim(-1.0, 2.0)
            ax.set(xlabel="epoch", ylabel="R(Q|S)", title=f"scope = {scope}: random queries' "
                   + ("mean ± std (clipped to [-1, 2])" if row == 0 else "median and quartiles"))
            ax.legend(fontsize=6)
    m = result["machine"]
    fig.suptitle(f"Approximation ratio R(Q|S): cnn, CIFAR-10, M = {s['initial']}, pool {s['pool']}, "
                 f"{s['draws']} random queries per b ({m['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: M = 200, pool 400, b = 50, 3 draws, 3 epochs")
    p.add_argument("--data-dir", type=Path, default=CIFAR,
                   help="CIFAR-10 folder with train.parquet (default ../shared/data/cifar10)")
    p.add_argument("--initial", type=int, default=None, help="M, labeled images (default 500; quick 200)")
    p.add_argument("--pool", type=int, default=None, help="unlabeled pool size (default 5000; quick 400)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="sizes b (default 250 500 1000; quick 50)")
    p.add_argument("--draws", type=int, default=None, help="random queries per b (default 20; quick 3)")
    p.add_argument("--max-epochs", type=int, default=None, help="default 100 (quick 3)")
    p.add_argument("--train-accuracy", type=float, default=0.99, help="convergence: training accuracy on S")
    p.add_argument("--scopes", nargs="+", default=["all", "last"], choices=["all", "last"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="folder for NAME.json/.md/.png (default benchmarks/results)")
    p.add_argument("--name", default=None, help="output file stem (default approximation_ratio[_quick])")
    p.add_argument("--replot", type=Path, default=None, help="rewrite the .md/.png of an existing result JSON and exit")
    args = p.parse_args(argv)
    if args.replot:
        result = json.loads(args.replot.read_text())
        result["findings"] = findings(result)
        args.replot.write_text(json.dumps(result, indent=1, default=float))
        write_markdown(result, args.replot.with_suffix(".md"))
        write_plot(result, args.replot.with_suffix(".png"))
        return
    args.initial = args.initial or (200 if args.quick else 500)
    args.pool = args.pool or (400 if args.quick else 5000)
    args.budgets = args.budgets or ([50] if args.quick else [250, 500, 1000])
    args.draws = args.draws or (3 if args.quick else 20)
    args.max_epochs = args.max_epochs if args.max_epochs is not None else (3 if args.quick else 100)
    args.data_dir = args.data_dir.resolve()
    result = run(args)
    print("\n".join(result["findings"]))
    stem = args.name or ("approximation_ratio_quick" if args.quick else "approximation_ratio")
    record.save(result, args.out, stem, write_markdown, write_plot)
    print(f"wrote {args.out}/{stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
