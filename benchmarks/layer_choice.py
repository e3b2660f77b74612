"""Calibrate the engine's per-layer choices for convolutions: "ghost" or "materialize", and how to materialise.

ray_dal/scoring/layers/common.py:prefer_ghost(T, fan_in, fan_out, "auto") picks the method per layer
(T output positions, fan_in = C_in/groups * kernel area, fan_out = C_out/groups). This script

1. collects every distinct Conv2d shape inside resnet18 and vgg11 (32x32 inputs),
2. times, per shape and batch size, the engine's conv handler
   ``ray_dal.scoring.layers.conv.conv(module, x, d, {"weight"}, {"weight": G}, method)`` with
   method "ghost" and "materialize" (dot term included, as in real use), and the ordinary summed
   weight gradient (``aten.convolution_backward``, output_mask (False, True, False)) as a yardstick,
3. reports the winner per shape, whether the engine's current rule picks it, whether the earlier
   rule (ghost iff 2 T^2 < fan_in*fan_out) does, and the range of the constant c in the cost-model rule
   "ghost iff T (fan_in + fan_out) < c fan_in fan_out" that is consistent with every measured winner,
4. times materialise's two kernels on narrow shapes (<= 16 input channels per group, the cnn's always):
   patches x output gradient against the grouped convolution weight-gradient, and whether the engine's
   rule (patches up to ``conv.NARROW_CHANNELS`` channels per group) picks the faster,
5. times end to end ``dynamic_scores(..., layer_method=...)`` per model for "auto", "ghost",
   "materialize" and "auto" with the earlier rule patched in (this process only; the engine's files are
   untouched), against a training step.

Round-robin over methods inside each repetition; medians. Writes benchmarks/results/layer_choice.{json,md,png}.

    python benchmarks/layer_choice.py --quick       # smoke run (~15 s): cnn's two conv shapes at B=32, cnn end to end
    python benchmarks/layer_choice.py
    python benchmarks/layer_choice.py --quick --out /tmp/x   # write NAME.{json,md,png} elsewhere
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import record  # benchmarks/record.py
import torch
import torch.nn.functional as F
from torch import nn

from ray_dal.models import build_model
from ray_dal.scoring import dynamic_scores, labeled_gradient
from ray_dal.scoring.layers.common import prefer_ghost

# the module (ray_dal.scoring.layers re-exports a function of the same name, which `import ... as` would give)
conv_layer = importlib.import_module("ray_dal.scoring.layers.conv")

REPO = Path(__file__).resolve().parents[1]
LAYER_METHODS = ["ghost", "materialize", "weight_grad"]
E2E_METHODS = ["train_step", "auto", "ghost", "materialize", "auto_previous_rule"]


def current_rule(T: int, fan_in: int, fan_out: int) -> bool:
    """True = ghost. The engine's rule, as it is in the working tree."""
    return prefer_ghost(T, fan_in, fan_out, "auto")


def previous_rule(T: int, fan_in: int, fan_out: int) -> bool:
    """True = ghost. The engine's first rule (DESIGN.md): ghost when 2 T^2 < the weight count."""
    return 2 * T * T < fan_in * fan_out


def cost_ratio(T: int, fan_in: int, fan_out: int) -> float:
    """Ghost's Gram-matrix work over materialise's weight-gradient work, per sample:
    T^2 (fan_in + fan_out) / (T fan_in fan_out) = T (fan_in + fan_out) / (fan_in fan_out)."""
    return T * (fan_in + fan_out) / (fan_in * fan_out)


# ----------------------------------------------------------------------------------------------------


def conv_shapes(model_names, size=32):
    """Distinct Conv2d shapes: key -> {module, in_shape, out_shape, where: [model:layer, ...]}."""
    shapes = {}
    for name in model_names:
        torch.manual_seed(0)
        model = build_model(name, 10).eval()
        seen = []
        hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.append((n, m, a[0].shape, o.shape)))
                 for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            model(torch.randn(1, 3, size, size))
        for h in hooks:
            h.remove()
        for layer, m, in_shape, out_shape in seen:
            key = (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], in_shape[-1])
            entry = shapes.setdefault(key, {"module": m, "in_shape": tuple(in_shape[1:]),
                                            "out_shape": tuple(out_shape[1:]), "where": []})
            entry["where"].append(f"{name}:{layer}")
    return shapes


def weight_grad(module, x, d):
    return torch.ops.aten.convolution_backward(
        d, x, module.weight, None, module.stride, module.padding, module.dilation, False, (0, 0),
        module.groups, (False, True, False))[1]


def round_robin(fns: dict, repeats: int, cpu_out: dict | None = None) -> dict:
    """Median wall seconds per function (median process CPU seconds into ``cpu_out`` if given)."""
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    cpus = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
            cpus[k].append(time.process_time() - c0)
    if cpu_out is not None:
        cpu_out.update({k: statistics.median(v) for k, v in cpus.items()})
    return {k: statistics.median(v) for k, v in times.items()}


def bench_layers(shapes, batch_sizes, repeats):
    rows = []
    for (cin, cout, k, stride, pad, hin), e in shapes.items():
        m = e["module"]
        G = torch.randn_like(m.weight)
        for B in batch_sizes:
            x = torch.randn(B, *e["in_shape"])
            d = torch.randn(B, *e["out_shape"])
            cpu = {}
            with torch.no_grad():
                med = round_robin({
                    "ghost": lambda: conv_layer.conv(m, x, d, {"weight"}, {"weight": G}, "ghost"),
                    "materialize": lambda: conv_layer.conv(m, x, d, {"weight"}, {"weight": G}, "materialize"),
                    "weight_grad": lambda: weight_grad(m, x, d),
                }, repeats, cpu)
            T = e["out_shape"][1] * e["out_shape"][2]
            fan_in, fan_out = cin // m.groups * k * k, cout // m.groups
            winner_ghost = med["ghost"] < med["materialize"]
            rows.append({
                "shape": f"{cin}->{cout} k{k} s{stride} in {hin}x{hin}", "B": B, "T": T, "fan_in": fan_in,
                "fan_out": fan_out, "T2_over_weights": T * T / (fan_in * fan_out),
                "cost_ratio": cost_ratio(T, fan_in, fan_out),
                "layers": e["where"], "seconds": med, "cpu_seconds": cpu,
                "winner_by_cpu_time": "ghost" if cpu["ghost"] < cpu["materialize"] else "materialize",
                "ghost_over_materialize": med["ghost"] / med["materialize"],
                "winner": "ghost" if winner_ghost else "materialize",
                "current_rule": "ghost" if current_rule(T, fan_in, fan_out) else "materialize",
                "previous_rule": "ghost" if previous_rule(T, fan_in, fan_out) else "materialize",
            })
            r = rows[-1]
            print(f"{r['shape']:28s} B={B:3d} T={T:4d} ghost {med['ghost'] * 1e3:8.1f} ms  materialize "
                  f"{med['materialize'] * 1e3:8.1f} ms  weight_grad {med['weight_grad'] * 1e3:7.1f} ms  "
                  f"winner {r['winner']:11s} current {r['current_rule']}", flush=True)
    return rows


def bench_narrow(shapes, batch_sizes, repeats, max_channels=16):
    """Materialise's two per-sample weight-gradient kernels on shapes with <= ``max_channels`` input channels per
    group: patches x output gradient (chunked) against the convolution weight-gradient with the batch in the
    groups. The engine takes patches up to ``NARROW_CHANNELS`` input channels per group."""
    rows = []
    for (cin, cout, k, stride, pad, hin), e in shapes.items():
        m = e["module"]
        per_group = cin // m.groups
        if per_group > max_channels:
            continue
        for B in batch_sizes:
            x, d = torch.randn(B, *e["in_shape"]), torch.randn(B, *e["out_shape"])
            padded, padding = conv_layer._padded(m, x)

            def kernel(narrow):
                def run():
                    saved, conv_layer.NARROW_CHANNELS = conv_layer.NARROW_CHANNELS, narrow
                    try:
                        return conv_layer._per_sample_weight_grad(m, padded, d, padding)
                    finally:
                        conv_layer.NARROW_CHANNELS = saved
                return run

            with torch.no_grad():
                med = round_robin({"patches": kernel(max_channels), "grouped": kernel(0),
                                   "weight_grad": lambda: weight_grad(m, x, d)}, repeats)
            winner = "patches" if med["patches"] < med["grouped"] else "grouped"
            rows.append({"shape": f"{cin}->{cout} k{k} s{stride} in {hin}x{hin}", "B": B,
                         "in_channels_per_group": per_group, "layers": e["where"], "seconds": med,
                         "grouped_over_patches": med["grouped"] / med["patches"], "winner": winner,
                         "rule": "patches" if per_group <= conv_layer.NARROW_CHANNELS else "grouped"})
            print(f"narrow {rows[-1]['shape']:28s} B={B:3d} patches {med['patches'] * 1e3:7.2f} ms  grouped "
                  f"{med['grouped'] * 1e3:7.2f} ms  weight_grad {med['weight_grad'] * 1e3:6.2f} ms  winner {winner}",
                  flush=True)
    return rows


@contextmanager
def patched_rule(rule):
    """Swap the conv handler's rule for ``rule`` in this process only (the engine's file is untouched)."""
    original = conv_layer.prefer_ghost

    def patched(T, fan_in, fan_out, method):
        return original(T, fan_in, fan_out, method) if method != "auto" else rule(T, fan_in, fan_out)

    conv_layer.prefer_ghost = patched
    try:
        yield
    finally:
        conv_layer.prefer_ghost = original


def bench_end_to_end(models, batch_sizes, repeats):
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = build_model(name, 10).eval()
        gen = torch.Generator().manual_seed(1)
        G = labeled_gradient(model, (torch.randn(64, 3, 32, 32, generator=gen),
                                     torch.randint(0, 10, (64,), generator=gen)))
        for B in batch_sizes:
            x = torch.randn(B, 3, 32, 32, generator=gen)
            y = torch.randint(0, 10, (B,), generator=gen)

            def train_step():
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y, reduction="sum").backward()

            def previous():
                with patched_rule(previous_rule):
                    return dynamic_scores(model, x, G, 2.0, layer_method="auto")

            fns = {
                "train_step": train_step,
                "auto": lambda: dynamic_scores(model, x, G, 2.0, layer_method="auto"),
                "ghost": lambda: dynamic_scores(model, x, G, 2.0, layer_method="ghost"),
                "materialize": lambda: dynamic_scores(model, x, G, 2.0, layer_method="materialize"),
                "auto_previous_rule": previous,
            }
            ref = fns["auto"]()
            agree = {k: float((fns[k]() - ref).abs().max() / ref.abs().max()) for k in E2E_METHODS[2:]}
            med = round_robin(fns, repeats)
            row = {"model": name, "B": B, "seconds": med,
                   "over_train_step": {k: med[k] / med["train_step"] for k in med},
                   "max_rel_diff_vs_auto": agree}
            rows.append(row)
            print(f"{name} B={B}: " + ", ".join(f"{k} {v:.3f}s ({row['over_train_step'][k]:.2f}x)"
                                                 for k, v in med.items()), flush=True)
    return rows


def write_markdown(result, path: Path):
    s, m = result["settings"], result["machine"]
    lines = [
        "# Ghost vs materialise per Conv2d shape (generated by benchmarks/layer_choice.py)", "",
        f"{m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} ({m['torch_threads']} threads); "
        f"{m['date_utc']}, commit {(m['git_commit'] or '?')[:8]}{' (ray_dal modified)' if m['ray_dal_dirty'] else ''}; "
        f"medians of {s['repeats']} round-robin repetitions; load average at start/end "
        f"{m['load_average_at_start']} / {m['load_average_at_end']} (shared machine).",
        "Times in ms for one call of the engine's conv handler (weight only, with the <g, G> term); "
        "weight_grad = the ordinary summed weight gradient of the same layer (yardstick).",
        f"current rule (engine): {result['current_rule']}; previous: {result['previous_rule']}. "
        "cost ratio = T (fan_in + fan_out) / (fan_in fan_out).", "",
        "| shape | B | T | fan_in*fan_out | cost ratio | ghost ms | materialize ms | weight_grad ms "
        "| ghost/mat | winner | current | previous | winner by CPU time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = lambda a, b: a if a == b else f"**{a}** (wrong)"
    for r in result["layers"]:
        sec = r["seconds"]
        lines.append(
            f"| {r['shape']} | {r['B']} | {r['T']} | {r['fan_in'] * r['fan_out']} | {r['cost_ratio']:.3g} | "
            f"{sec['ghost'] * 1e3:.1f} | {sec['materialize'] * 1e3:.1f} | {sec['weight_grad'] * 1e3:.1f} | "
            f"{r['ghost_over_materialize']:.2f} | {r['winner']} | {ok(r['current_rule'], r['winner'])} | "
            f"{ok(r['previous_rule'], r['winner'])} | {r['winner_by_cpu_time']} |")
    sm = result["summary"]
    lines += ["", f"Current rule picks the faster method in {sm['current_rule_correct']}/{sm['shapes_x_batch']} "
              f"(time lost vs always-right, summed over distinct shapes: {sm['current_rule_excess_s'] * 1e3:.0f} ms); "
              f"previous rule {sm['previous_rule_correct']}/{sm['shapes_x_batch']} "
              f"({sm['previous_rule_excess_s'] * 1e3:.0f} ms). "
              + (f"Every winner is consistent with 'ghost iff cost ratio < c' for c in "
                 f"({sm['consistent_c'][0]:.3g}, {sm['consistent_c'][1]:.3g}]."
                 if sm["consistent_c"][0] < sm["consistent_c"][1] else
                 f"No single c in 'ghost iff cost ratio < c' fits every winner (largest ghost-winning ratio "
                 f"{sm['consistent_c'][0]:.3g}, smallest materialise-winning ratio {sm['consistent_c'][1]:.3g}).")]
    lines += ["", "Layers per shape: " + "; ".join(
        f"{r['shape']}: {', '.join(r['layers'])}" for r in result["layers"] if r["B"] == s["batch_sizes"][0]), ""]
    lines += [f"## Narrow convolutions: patches x output gradient vs the grouped kernel (materialise; the engine "
              f"takes patches up to {result['narrow_channels']} input channels per group)", "",
              "| shape | B | in channels / group | patches ms | grouped ms | weight_grad ms | grouped/patches | winner "
              "| rule |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["narrow"]:
        sec = r["seconds"]
        lines.append(f"| {r['shape']} | {r['B']} | {r['in_channels_per_group']} | {sec['patches'] * 1e3:.2f} | "
                     f"{sec['grouped'] * 1e3:.2f} | {sec['weight_grad'] * 1e3:.2f} | {r['grouped_over_patches']:.2f} | "
                     f"{r['winner']} | {ok(r['rule'], r['winner'])} |")
    lines += ["", "## End to end: dynamic_scores(scope='all') by layer_method, seconds (x train_step)", "",
              "| model | B | " + " | ".join(E2E_METHODS) + " |", "|---|---|" + "---|" * len(E2E_METHODS)]
    for r in result["end_to_end"]:
        lines.append(f"| {r['model']} | {r['B']} | " + " | ".join(
            f"{r['seconds'][k]:.3f} ({r['over_train_step'][k]:.2f}x)" for k in E2E_METHODS) + " |")
    lines += ["", "Scores agree across layer methods (max |s - s_auto| / max |s_auto|): " + "; ".join(
        f"{r['model']} B={r['B']}: " + ", ".join(f"{k} {v:.1e}" for k, v in r["max_rel_diff_vs_auto"].items())
        for r in result["end_to_end"])]
    path.write_text("\n".join(lines) + "\n")


def write_plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for B in sorted({r["B"] for r in result["layers"]}):
        rows = [r for r in result["layers"] if r["B"] == B]
        ax.scatter([r["cost_ratio"] for r in rows], [r["ghost_over_materialize"] for r in rows], label=f"B={B}")
    lo, hi = result["summary"]["consistent_c"]
    if lo < hi and hi != float("inf"):
        ax.axvspan(max(lo, 1e-3), hi, color="green", alpha=0.1, label="consistent c")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(xscale="log", yscale="log", xlabel="cost ratio T (fan_in + fan_out) / (fan_in fan_out)",
           ylabel="ghost time / materialize time", title="per Conv2d shape (below 1: ghost wins)")
    ax.legend(fontsize=8)
    ax, e2e = axes[1], result["end_to_end"]
    width = 0.8 / len(E2E_METHODS)
    for i, m in enumerate(E2E_METHODS):
        ax.bar([j + (i - len(E2E_METHODS) / 2 + 0.5) * width for j in range(len(e2e))],
               [r["over_train_step"][m] for r in e2e], width, label=m)
    ax.set_xticks(range(len(e2e)), [f"{r['model']}\nB={r['B']}" for r in e2e])
    ax.set(ylabel="time / train_step", title="dynamic_scores end to end by layer_method"
           + ("" if e2e else " (skipped)"))
    if e2e:
        ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"Ghost vs materialise ({m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; medians)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="cnn only (its two conv shapes), B=32, 3 repeats")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="default 7 (quick 3)")
    p.add_argument("--e2e-repeats", type=int, default=None, help="default 5 (quick 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-e2e", action="store_true", help="per-layer table only")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="folder for NAME.json/.md/.png (default benchmarks/results)")
    p.add_argument("--name", default=None, help="output file stem (default layer_choice, quick: layer_choice_quick)")
    args = p.parse_args(argv)
    args.models = args.models or (["cnn"] if args.quick else ["resnet18", "vgg11"])
    args.batch_sizes = args.batch_sizes or ([32] if args.quick else [64, 128])
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.e2e_repeats = args.e2e_repeats or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    result = {"machine": record.machine_info(torch_threads=torch.get_num_threads()),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "current_rule": (prefer_ghost.__doc__ or "").strip().splitlines()[0],
              "previous_rule": "ghost iff 2 T^2 < fan_in fan_out"}
    result["layers"] = bench_layers(conv_shapes(args.models), args.batch_sizes, args.repeats)
    result["narrow_channels"] = conv_layer.NARROW_CHANNELS
    result["narrow"] = bench_narrow(conv_shapes(dict.fromkeys(["cnn", *args.models])), args.batch_sizes, args.repeats)
    result["end_to_end"] = [] if args.skip_e2e else bench_end_to_end(args.models, args.batch_sizes, args.e2e_repeats)
    rows = result["layers"]
    result["summary"] = {
        "shapes_x_batch": len(rows),
        "current_rule_correct": sum(r["current_rule"] == r["winner"] for r in rows),
        "previous_rule_correct": sum(r["previous_rule"] == r["winner"] for r in rows),
        # time lost against always picking the faster method, summed over distinct shapes
        "current_rule_excess_s": sum(r["seconds"][r["current_rule"]] - r["seconds"][r["winner"]] for r in rows),
        "previous_rule_excess_s": sum(r["seconds"][r["previous_rule"]] - r["seconds"][r["winner"]] for r in rows),
        # ghost wins iff cost_ratio < c: c must exceed every ghost winner's ratio and not exceed any other's
        "consistent_c": [max([r["cost_ratio"] for r in rows if r["winner"] == "ghost"], default=0.0),
                         min([r["cost_ratio"] for r in rows if r["winner"] != "ghost"], default=float("inf"))],
    }
    print(json.dumps(result["summary"]))
    stem = args.name or ("layer_choice_quick" if args.quick else "layer_choice")
    record.save(result, args.out, stem, write_markdown, write_plot)
    print(f"wrote {args.out}/{stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
