"""What does a dynamic score cost? ray_dal's engine against its floors and the other ways to compute it.

For each model and batch size, in ONE process, this times:

  train_step    forward + backward (reduction="sum" CE, eval mode) into .grad: the floor for scope="all"
  forward       one inference forward under torch.inference_mode: the floor for scope="last"
  ray_dal_all   ray_dal.scoring.dynamic_scores(model, x, G, gamma=2, scope="all")
  ray_dal_last  the same with scope="last"
  vmap          ray_dal.scoring.reference.vmap_scores (torch.func vmap(grad), chunk_size=16); note it
                keeps all B per-sample gradients ([B, P]) before reducing them
  vmap_chunked  the same torch.func per_sample_norm_and_dot, called on slices of 16 samples and reduced
                per slice (memory 16 x P): separates torch.func's cost from the [B, P] memory traffic
  loop          ray_dal.scoring.reference.loop_scores (one autograd backward per sample)
  backpack      BackPACK BatchGrad per-sample gradients, then ||g||^2 + 2<g, G> (the authors' approach)

Methods run round-robin inside each repetition (the starting method rotates), so the noise of a shared
machine hits all of them alike; we report medians and ratios of medians. Every method's scores are
checked against ray_dal_all and against float64 ground truth (ray_dal_all on a float64 copy of the
model, itself checked against a float64 per-sample loop on a few samples per model).

Peak memory: a background thread samples this process's RSS (psutil, every ~1 ms) during each timed
call; we report max over calls of (peak RSS - RSS just before the call), after gc + malloc_trim. It is
approximate: allocations shorter than the sampling interval can be missed, and memory the allocator
reuses without returning to the OS is not seen as new.

    python benchmarks/scoring_cost.py --quick          # smoke run (~20 s): cnn at B=16, 1 repeat, every method
    python benchmarks/scoring_cost.py                  # full run: writes benchmarks/results/scoring_cost.*
    python benchmarks/scoring_cost.py --quick --out /tmp/x   # write NAME.{json,md,png} elsewhere
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import statistics
import threading
import time
import warnings
from pathlib import Path

import psutil
import record  # benchmarks/record.py
import torch
import torch.nn.functional as F
from torch import nn

from ray_dal.models import build_model
from ray_dal.scoring import dynamic_scores, labeled_gradient
from ray_dal.scoring.modes import eval_mode
from ray_dal.scoring.params import scoped_parameters
from ray_dal.scoring.reference import combine, loop_scores, per_sample_norm_and_dot, vmap_scores

METHODS = ["train_step", "forward", "ray_dal_all", "ray_dal_last", "vmap", "vmap_chunked", "loop", "backpack"]
SCORED = METHODS[2:]
SLOW = {"vmap", "vmap_chunked", "loop", "backpack"}  # timed --slow-repeats times, warmed up on a slice of the batch
RATIOS = {  # name -> (numerator, denominator)
    "all/train_step": ("ray_dal_all", "train_step"),
    "last/forward": ("ray_dal_last", "forward"),
    "vmap/all": ("vmap", "ray_dal_all"),
    "vmap_chunked/all": ("vmap_chunked", "ray_dal_all"),
    "loop/all": ("loop", "ray_dal_all"),
    "backpack/all": ("backpack", "ray_dal_all"),
}
GAMMA = 2.0
NUM_CLASSES = 10
AGREEMENT_TOL = 1e-2  # max_rel_diff above this = a method computes something else (float32 noise is <= ~1e-3)
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# measurement helpers


class PeakRSS:
    """Samples this process's RSS in a background thread while active: ``delta_mb`` = peak - start."""

    def __init__(self, interval_s: float = 0.001):
        self.proc = psutil.Process()
        self.interval_s = interval_s

    def __enter__(self):
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.delta_mb = (self.peak - self.start) / 2**20


try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: skip trimming
    _libc = None


def release_memory() -> None:
    """Give freed heap memory back to the OS so the next call's RSS growth is visible."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


def timed_call(fn):
    """(wall seconds, process CPU seconds, peak RSS growth in MiB, result) of one call."""
    release_memory()
    with PeakRSS() as mem:
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return seconds, cpu, mem.delta_mb, result


def max_rel_diff(scores: torch.Tensor, ref: torch.Tensor) -> float:
    """max_i |s_i - r_i| / max_i |r_i| (scale-relative: scores can be near zero or negative)."""
    return float((scores.double() - ref.double()).abs().max() / ref.double().abs().max())


# ----------------------------------------------------------------------------------------------------
# the methods


def chunked_vmap_scores(model: nn.Module, x: torch.Tensor, G: dict, chunk: int = 16) -> torch.Tensor:
    """torch.func per-sample gradients of ``chunk`` samples at a time, reduced before the next slice."""
    params = scoped_parameters(model, "all")
    with eval_mode(model):
        parts = [per_sample_norm_and_dot(model, x[i : i + chunk], params, G, chunk_size=chunk)
                 for i in range(0, x.shape[0], chunk)]
    return combine(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), GAMMA).detach()


def backpack_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A BackPACK-extended copy of ``model`` and a sum-reduction CE loss.

    BackPACK's module hooks cannot follow in-place ops on a hooked module's output (VGG11's
    ReLU(inplace=True) raises), so the copy's in-place ReLUs are switched off: same numbers,
    what a user of BackPACK has to do.
    """
    from backpack import extend

    copy_ = copy.deepcopy(model).eval()
    for m in copy_.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return extend(copy_), extend(nn.CrossEntropyLoss(reduction="sum"))


def backpack_scores(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, G: dict) -> torch.Tensor:
    """||g||^2 + gamma <g, G> from BackPACK's per-sample gradients (``p.grad_batch``)."""
    from backpack import backpack
    from backpack.extensions import BatchGrad

    model.zero_grad(set_to_none=True)
    logits = model(x)
    labels = logits.detach().argmax(dim=1)
    with backpack(BatchGrad()):
        loss_fn(logits, labels).backward()
    sq = torch.zeros(x.shape[0], dtype=logits.dtype)
    dot = torch.zeros_like(sq)
    for name, p in model.named_parameters():
        gb = p.grad_batch.flatten(1)
        sq += (gb * gb).sum(1)  # torch.sum's cascade summation: accurate (a long bmm/einsum dot is not)
        dot += gb @ G[name].flatten().to(gb.dtype)
        del p.grad_batch
    model.zero_grad(set_to_none=True)
    return sq + GAMMA * dot


def backpack_on_unmodified(model: nn.Module, x: torch.Tensor, G: dict) -> str | None:
    """Does BackPACK run on the model exactly as built? None if yes, else the error it raises."""
    from backpack import extend

    m = extend(copy.deepcopy(model).eval())
    try:
        backpack_scores(m, extend(nn.CrossEntropyLoss(reduction="sum")), x, G)
        return None
    except Exception as err:  # record, do not hide
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def make_methods(model, bp_model, bp_loss, x, y, G, G_last):
    def train_step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()

    def forward():
        with torch.inference_mode():
            return model(x)

    return {
        "train_step": train_step,
        "forward": forward,
        "ray_dal_all": lambda xs=x: dynamic_scores(model, xs, G, GAMMA, scope="all"),
        "ray_dal_last": lambda xs=x: dynamic_scores(model, xs, G_last, GAMMA, scope="last"),
        "vmap": lambda xs=x: vmap_scores(model, xs, G, GAMMA, scope="all", chunk_size=16),
        "vmap_chunked": lambda xs=x: chunked_vmap_scores(model, xs, G),
        "loop": lambda xs=x: loop_scores(model, xs, G, GAMMA, scope="all"),
        "backpack": lambda xs=x: backpack_scores(bp_model, bp_loss, xs, G),
    }


# ----------------------------------------------------------------------------------------------------
# the benchmark


def bench_cell(name, model, bp_model, bp_loss, G, G_last, f64, B, args, gen) -> dict:
    """Time every method on one (model, batch size)."""
    x = torch.randn(B, 3, 32, 32, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (B,), generator=gen)
    fns = make_methods(model, bp_model, bp_loss, x, y, G, G_last)
    n_params = sum(p.numel() for p in model.parameters())

    skipped = {}
    for m in args.methods:
        if m == "loop" and B > args.loop_max_batch:
            skipped[m] = f"not measured: B > --loop-max-batch {args.loop_max_batch}"
        if m in ("backpack", "vmap"):  # both hold all B per-sample gradients at once
            need_gb = B * n_params * 4 / 2**30
            if need_gb > args.max_per_sample_gb:
                skipped[m] = (f"not measured: its B per-sample gradients alone need B*P*4 bytes = {need_gb:.1f} GiB "
                              f"> --max-per-sample-gb {args.max_per_sample_gb} (shared machine)")
    run = [m for m in args.methods if m not in skipped]

    # warm-up: full batch for the fast methods, a slice of 8 for the slow ones
    errors = {}
    for m in run:
        try:
            fns[m]() if m not in SLOW else fns[m](x[:8])
        except Exception as err:
            errors[m] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    run = [m for m in run if m not in errors]

    times = {m: [] for m in run}
    cpus = {m: [] for m in run}
    mems = {m: [] for m in run}
    scores = {}
    for r in range(args.repeats):
        order = run[r % len(run):] + run[: r % len(run)]  # rotate the starting method
        for m in order:
            if m in SLOW and r >= args.slow_repeats:
                continue
            seconds, cpu, mem_mb, out = timed_call(fns[m])
            times[m].append(seconds)
            cpus[m].append(cpu)
            mems[m].append(mem_mb)
            if m not in scores and out is not None and out.dim() == 1:
                scores[m] = out.detach()
        print(f"  {name} B={B} repeat {r + 1}/{args.repeats} done", flush=True)

    cell = {"model": name, "batch_size": B, "methods": {}}
    ref = scores.get("ray_dal_all")
    m64, G64, G64_last = f64
    truth = dynamic_scores(m64, x.double(), G64, GAMMA, scope="all")
    truth_last = dynamic_scores(m64, x.double(), G64_last, GAMMA, scope="last")
    for m in args.methods:
        entry = {}
        if m in skipped:
            entry["status"] = skipped[m]
        elif m in errors:
            entry["status"] = "error: " + errors[m]
        else:
            entry.update(status="ok", times_s=[round(t, 5) for t in times[m]], n=len(times[m]),
                         median_s=statistics.median(times[m]), cpu_times_s=[round(t, 5) for t in cpus[m]],
                         median_cpu_s=statistics.median(cpus[m]), peak_mem_mb=round(max(mems[m]), 1))
            if m in scores and m not in ("ray_dal_all", "ray_dal_last") and ref is not None:
                entry["max_rel_diff_vs_ray_dal_all"] = max_rel_diff(scores[m], ref)
            if m in scores:
                entry["max_rel_diff_vs_float64"] = max_rel_diff(scores[m], truth_last if m == "ray_dal_last" else truth)
            if m == "ray_dal_last":
                oracle = vmap_scores(model, x, G_last, GAMMA, scope="last", chunk_size=16)
                entry["max_rel_diff_vs_vmap_last"] = max_rel_diff(scores[m], oracle)
        cell["methods"][m] = entry
    med = {m: e["median_s"] for m, e in cell["methods"].items() if e["status"] == "ok"}
    cell["ratios"] = {k: (med[a] / med[b] if a in med and b in med else None) for k, (a, b) in RATIOS.items()}
    cpu = {m: e["median_cpu_s"] for m, e in cell["methods"].items() if e["status"] == "ok"}
    cell["cpu_ratios"] = {k: (cpu[a] / cpu[b] if a in cpu and b in cpu else None) for k, (a, b) in RATIOS.items()}
    cell["ratio_to_train_step"] = {m: med[m] / med["train_step"] for m in med if "train_step" in med}
    return cell


def agreement(result: dict, methods: list[str]) -> dict:
    """Did every scored method run (or get deliberately skipped) and agree with ray_dal_all and with float64
    truth within AGREEMENT_TOL?"""
    worst, not_run, skipped = {}, [], []
    for c in result["cells"]:
        for m in methods:
            e = c["methods"].get(m, {})
            if e.get("status") != "ok":  # a deliberate skip (--loop-max-batch, --max-per-sample-gb) is no failure
                status = e.get("status", "missing")
                (skipped if status.startswith("not measured") else not_run).append(
                    f"{c['model']} B={c['batch_size']} {m}: {status}")
                continue
            for k in ("vs_ray_dal_all", "vs_float64", "vs_vmap_last"):
                if "max_rel_diff_" + k in e:
                    worst[f"{m} {k}"] = max(worst.get(f"{m} {k}", 0.0), e["max_rel_diff_" + k])
    for name, a in result["float64_anchor"].items():
        for k in ("ray_dal_all_f32", "ray_dal_all_f64", "vmap_f32", "loop_f32"):
            worst[f"anchor {k}"] = max(worst.get(f"anchor {k}", 0.0), a[k])
    bad = {k: v for k, v in worst.items() if not v <= AGREEMENT_TOL}
    return {"tolerance": AGREEMENT_TOL, "max_rel_diff": worst, "not_run": not_run, "skipped": skipped,
            "over_tolerance": bad, "ok": not bad and not not_run}


def float64_anchor(model, G, gen, n=8) -> dict:
    """ray_dal_all (float32) and the float32 oracles against a float64 per-sample loop on n samples."""
    x = torch.randn(n, 3, 32, 32, generator=gen)
    m64 = copy.deepcopy(model).double()
    G64 = {k: v.double() for k, v in G.items()}
    truth = loop_scores(m64, x.double(), G64, GAMMA)
    return {
        "n_samples": n,
        "ray_dal_all_f32": max_rel_diff(dynamic_scores(model, x, G, GAMMA), truth),
        "ray_dal_all_f64": max_rel_diff(dynamic_scores(m64, x.double(), G64, GAMMA), truth),
        "vmap_f32": max_rel_diff(vmap_scores(model, x, G, GAMMA), truth),
        "loop_f32": max_rel_diff(loop_scores(model, x, G, GAMMA), truth),
    }




# ----------------------------------------------------------------------------------------------------
# output


def fmt_s(e):
    return f"{e['median_s']:.3g}" if e.get("status") == "ok" else "n/m" if e["status"].startswith("not") else "err"


def noisy(cell: dict, limit: float = 1.5) -> bool:
    """Did the baseline or the engine's repeats spread by more than ``limit`` x (max/min)?"""
    for m in ("train_step", "forward", "ray_dal_all", "ray_dal_last"):
        t = cell["methods"].get(m, {}).get("times_s")
        if t and max(t) / min(t) > limit:
            return True
    return False


def min_ratios(cell: dict) -> dict:
    """Ratios of the fastest repeat of each method (robust to added load, but optimistic)."""
    best = {m: min(e["times_s"]) for m, e in cell["methods"].items() if e.get("times_s")}
    return {k: (best[a] / best[b] if a in best and b in best else None) for k, (a, b) in RATIOS.items()}


def write_markdown(result: dict, path: Path) -> None:
    info, lines = result["machine"], []
    lines += [
        "# Scoring cost (generated by benchmarks/scoring_cost.py)", "",
        *(["**PARTIAL: the run did not finish; these are the cells it measured.**", ""] if result.get("partial") else []),
        f"{info['cpu']}, {info['logical_cores']} logical cores, torch {info['torch']} ({info['torch_threads']} threads), "
        f"numpy {info['numpy']}, backpack-for-pytorch {info['backpack']}, {info['date_utc']}, "
        f"commit {str(info['git_commit'])[:8]}{' (ray_dal modified)' if info['ray_dal_dirty'] else ''}. "
        f"Load average at start {info['load_average_at_start']} (shared machine: expect noise).",
        f"Settings: {json.dumps(result['settings'])}", "",
        "Seconds are medians (n = repeats); ratios are ratios of medians from the same process. "
        "n/m = not measured (see JSON for why), err = the method raised. "
        "† = noisy cell: some baseline or engine repeat took > 1.5x another (another job took the cores); "
        "see the cross-check tables below.", "",
        "| model | B | " + " | ".join(f"{m} s" for m in METHODS) + " | " + " | ".join(RATIOS) + " |",
        "|---|---|" + "---|" * (len(METHODS) + len(RATIOS)),
    ]
    for c in result["cells"]:
        ms, r = c["methods"], c["ratios"]
        get = lambda m: fmt_s(ms[m]) if m in ms else "-"
        rat = lambda k: f"{r[k]:.2f}" if r.get(k) is not None else "-"
        lines.append(f"| {c['model']} | {c['batch_size']}{' †' if noisy(c) else ''} | "
                     + " | ".join(get(m) for m in METHODS) + " | "
                     + " | ".join(rat(k) for k in RATIOS) + " |")
    for title, ratios_of in [
        ("Cross-check under load 1: the same ratios from median process CPU time (all threads) instead of wall time",
         lambda c: c.get("cpu_ratios", {})),
        ("Cross-check under load 2: the same ratios from each method's fastest repeat (wall time)", min_ratios),
    ]:
        lines += ["", title + ":", "", "| model | B | " + " | ".join(RATIOS) + " |", "|---|---|" + "---|" * len(RATIOS)]
        for c in result["cells"]:
            r = ratios_of(c)
            lines.append(f"| {c['model']} | {c['batch_size']}{' †' if noisy(c) else ''} | " + " | ".join(
                f"{r[k]:.2f}" if r.get(k) is not None else "-" for k in RATIOS) + " |")
    lines += ["", "Peak RSS growth per call, MiB (approximate; max over timed calls):", "",
              "| model | B | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for c in result["cells"]:
        ms = c["methods"]
        cell = lambda m: (f"{ms[m]['peak_mem_mb']:.0f}" if ms.get(m, {}).get("status") == "ok" else "-")
        lines.append(f"| {c['model']} | {c['batch_size']} | " + " | ".join(cell(m) for m in METHODS) + " |")
    d = lambda ms, m, k: f"{ms[m][k]:.1e}" if k in ms.get(m, {}) else "-"
    lines += ["", "Agreement, max_i |s_i - ref_i| / max_i |ref_i|. Against ray_dal_all (float32); "
              "ray_dal_last against vmap_scores(scope='last'):", "",
              "| model | B | vmap | vmap_chunked | loop | backpack | ray_dal_last |", "|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        ms = c["methods"]
        lines.append(f"| {c['model']} | {c['batch_size']} | " + " | ".join(
            d(ms, m, "max_rel_diff_vs_ray_dal_all") for m in ("vmap", "vmap_chunked", "loop", "backpack"))
            + f" | {d(ms, 'ray_dal_last', 'max_rel_diff_vs_vmap_last')} |")
    lines += ["", "Against float64 ground truth (ray_dal_all, or ray_dal_last, on a float64 copy of the model):", "",
              "| model | B | " + " | ".join(SCORED) + " |", "|---|---|" + "---|" * len(SCORED)]
    for c in result["cells"]:
        lines.append(f"| {c['model']} | {c['batch_size']} | "
                     + " | ".join(d(c["methods"], m, "max_rel_diff_vs_float64") for m in SCORED) + " |")
    lines += ["", "The float64 truth itself, and float32 methods, against a float64 per-sample loop "
              "(first few samples of a fresh batch):", "",
              "| model | ray_dal_all f32 | ray_dal_all f64 | vmap f32 | loop f32 |", "|---|---|---|---|---|"]
    for name, a in result["float64_anchor"].items():
        lines.append(f"| {name} | {a['ray_dal_all_f32']:.1e} | {a['ray_dal_all_f64']:.1e} | {a['vmap_f32']:.1e} "
                     f"| {a['loop_f32']:.1e} |")
    ag = result.get("agreement")
    if ag:
        lines += ["", f"Agreement check (every method ran, every max_rel_diff <= {ag['tolerance']:g}): "
                  + ("passed." if ag["ok"] else "**FAILED**: " + "; ".join(
                      ag["not_run"] + [f"{k} {v:.1e}" for k, v in ag["over_tolerance"].items()]))]
    lines += ["", "BackPACK on the models as built (the timed BackPACK copy has in-place ReLUs switched off):", ""]
    for name, note in result["backpack_on_unmodified_model"].items():
        lines.append(f"- {name}: {'runs' if note is None else 'raises ' + note}")
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(c["model"] for c in result["cells"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        cells = [c for c in result["cells"] if c["model"] == name]
        for m in METHODS:
            pts = [(c["batch_size"], c["ratio_to_train_step"][m]) for c in cells if m in c["ratio_to_train_step"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set(xscale="log", yscale="log", title=name, xlabel="batch size", ylabel="time / train_step")
        ax.set_xticks([c["batch_size"] for c in cells], [str(c["batch_size"]) for c in cells])
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    info = result["machine"]
    fig.suptitle(f"Scoring cost relative to one training step ({info['cpu']}, {info['torch_threads']} threads, "
                 f"torch {info['torch']}; medians)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------------


def write_all(result: dict, out: Path, stem: str, partial: bool) -> None:
    result["partial"] = partial
    record.save(result, out, stem, write_markdown, write_plot)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: cnn at B=16, 1 repeat, every method and the agreement check")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 5; quick 1)")
    p.add_argument("--slow-repeats", type=int, default=None,
                   help="repetitions for vmap/loop/backpack (default 2; quick 1)")
    p.add_argument("--loop-max-batch", type=int, default=256, help="time `loop` only up to this batch size")
    p.add_argument("--max-per-sample-gb", type=float, default=6.0,
                   help="skip vmap and backpack where their [B, P] per-sample gradients alone (B*P*4 bytes) exceed "
                        "this many GiB (their peak is 1.5-2x that); vmap_chunked still runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="folder for NAME.json/.md/.png (default benchmarks/results)")
    p.add_argument("--name", default=None, help="output file stem (default scoring_cost, quick: scoring_cost_quick)")
    p.add_argument("--from-json", type=Path, default=None, help="only rewrite the .md and .png of an earlier run's JSON")
    args = p.parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        write_markdown(result, args.from_json.with_suffix(".md"))
        write_plot(result, args.from_json.with_suffix(".png"))
        return result
    args.models = args.models or (["cnn"] if args.quick else ["cnn", "resnet18", "vgg11"])
    args.batch_sizes = args.batch_sizes or ([16] if args.quick else [32, 64, 128, 256])
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.slow_repeats = min(args.repeats, args.slow_repeats or (1 if args.quick else 2))
    stem = args.name or ("scoring_cost_quick" if args.quick else "scoring_cost")

    warnings.filterwarnings("ignore", module="backpack")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = {
        "machine": record.machine_info(torch_threads=args.threads),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "definitions": {
            "median_s": "median wall seconds of one call over n timed repetitions (after one warm-up call)",
            "median_cpu_s": "median process CPU seconds (all threads) of the same calls: less sensitive to other "
                            "processes taking the cores, but counts threads' spin-waiting",
            "peak_mem_mb": "max over timed calls of (peak sampled RSS - RSS before the call), MiB; approximate",
            "max_rel_diff": "max_i |s_i - ref_i| / max_i |ref_i|",
            "train_step": "eval mode (running BN stats untouched), random labels, CE(sum).backward() into .grad",
        },
        "cells": [], "float64_anchor": {}, "backpack_on_unmodified_model": {},
    }
    for name in args.models:
        torch.manual_seed(args.seed)
        model = build_model(name, NUM_CLASSES).eval()
        gen = torch.Generator().manual_seed(args.seed + 1)
        labeled = (torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (64,), generator=gen))
        G = labeled_gradient(model, labeled, scope="all")
        G_last = labeled_gradient(model, labeled, scope="last")
        bp_model, bp_loss = backpack_model(model)
        if "backpack" in args.methods:
            result["backpack_on_unmodified_model"][name] = backpack_on_unmodified(model, labeled[0][:8], G)
        result["float64_anchor"][name] = float64_anchor(model, G, gen)
        f64 = (copy.deepcopy(model).double(), {k: v.double() for k, v in G.items()},
               {k: v.double() for k, v in G_last.items()})
        for B in args.batch_sizes:
            cell = bench_cell(name, model, bp_model, bp_loss, G, G_last, f64, B, args, gen)
            result["cells"].append(cell)
            write_all(result, args.out, stem, partial=True)  # a killed run still leaves what it measured
            print(f"{name} B={B}: " + ", ".join(f"{m} {fmt_s(e)}s" for m, e in cell["methods"].items())
                  + " | " + ", ".join(f"{k} {v:.2f}" for k, v in cell["ratios"].items() if v is not None), flush=True)
    result["agreement"] = agreement(result, [m for m in args.methods if m in SCORED])
    ok = result["agreement"]["ok"]
    print("agreement check " + ("passed" if ok else f"FAILED: {result['agreement']}"), flush=True)
    result["total_wall_s"] = round(time.perf_counter() - started, 1)
    write_all(result, args.out, stem, partial=False)
    print(f"wrote {args.out}/{stem}.{{json,md,png}} in {result['total_wall_s']} s")
    return result


if __name__ == "__main__":
    main()
