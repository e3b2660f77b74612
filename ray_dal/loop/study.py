"""A study: the same experiment under several variants (strategies, gamma values) and seeds, summarised.

A study file (YAML, read with ``yaml.safe_load``) names a base experiment config, overrides for every
run, the variants and the seeds::

    config: cifar10.yaml                 # relative to the study file
    settings: {loop.budget: 100, ...}    # "section.key": value, for every run
    variants:                            # name -> overrides of this variant
      dynamic: {scoring.strategy: dynamic}
      gamma_0: {scoring.strategy: dynamic, scoring.gamma: 0}
    seeds: [0, 1, 2]
    out: runs/study_cifar10              # run i of variant v lands in OUT/v/seed_i
    panels: {strategies: [dynamic, ...]} # optional: which variants share a plot panel
    reference: {dynamic: 0.3684}         # optional: a published final accuracy to print beside ours
    baseline: [dynamic, dynamic_full]    # optional: compare every variant seed by seed with the baseline that
                                         # shares its settings besides scoring.* (one name or a list)

`run_study` runs every (seed, variant) in turn, seeds outermost (a study cut short has whole seeds),
each through `ray_dal.loop.simulation.run_experiment`, so re-running resumes it: finished runs are not redone.
`summarize` reads the runs' metrics into learning curves (test accuracy vs labels, mean and std over
the seeds), final accuracies and the area under the learning curve (AULC: the trapezoid area of
accuracy over the label range divided by its width, i.e. the mean accuracy across the budget). With a
``baseline``, every variant with a baseline's settings besides ``scoring.*`` (its pool and label schedule) and at
least 2 finished seeds in common with it is compared seed by seed (`paired`: baseline minus variant of final
accuracy and AULC, mean and standard error).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from ..config import ConfigError, ExperimentConfig, _known_keys, load_config
from .run_dir import RunDir

log = logging.getLogger("ray_dal")


@dataclass
class StudyConfig:
    config: str
    variants: dict[str, dict[str, Any]]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    settings: dict[str, Any] = field(default_factory=dict)
    out: str = "runs/study"
    panels: dict[str, list[str]] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)
    baseline: str | list[str] | None = None

    @property
    def baselines(self) -> list[str]:
        return [] if self.baseline is None else [self.baseline] if isinstance(self.baseline, str) else self.baseline


def load_study(path: str | Path, overrides: Mapping[str, Any] | None = None) -> tuple[StudyConfig, Path]:
    """The study at ``path`` (with ``overrides`` of its settings) and its base config's resolved path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"study file {str(path)!r} is not plain YAML data: {error}") from None
    _known_keys(values, {f.name for f in dataclasses.fields(StudyConfig)}, f"study file {path}")
    for key in ("config", "variants"):
        if key not in values:
            raise ConfigError(f"study file {path} needs '{key}'")
    study = StudyConfig(**values)
    study.settings = {**study.settings, **(overrides or {})}
    if not study.variants or not study.seeds:
        raise ConfigError(f"study file {path} needs at least one variant and one seed")
    unknown = sorted({v for names in study.panels.values() for v in names} - set(study.variants))
    if unknown:
        raise ConfigError(f"study file {path}: panels name variants {unknown} that are not in 'variants'")
    for name in study.baselines:
        if name not in study.variants:
            raise ConfigError(f"study file {path}: baseline {name!r} is not in 'variants'")
    base = (path.parent / study.config).resolve()
    for name in study.variants:  # every run's config is checked before the first one starts
        run_config(study, base, name, study.seeds[0])
    return study, base


def run_config(study: StudyConfig, base: Path, variant: str, seed: int) -> ExperimentConfig:
    out = Path(study.out) / variant / f"seed_{seed}"
    overrides = {**study.settings, **study.variants[variant], "loop.seed": seed, "loop.out": str(out)}
    try:
        return load_config(base, overrides)
    except ConfigError as error:
        raise ConfigError(f"study variant {variant!r}: {error}") from None


def run_study(study: StudyConfig, base: Path, variants: list[str] | None = None,
              seeds: list[int] | None = None) -> None:
    """Run (or resume) every seed x variant of ``study`` (only ``variants`` / ``seeds`` if given), seeds outermost."""
    from .simulation import run_experiment  # Ray is imported only when runs are made

    names = _part("variants", variants or list(study.variants), list(study.variants))
    for seed in _part("seeds", study.seeds if seeds is None else seeds, study.seeds):
        for name in names:
            log.info("study: %s, seed %d", name, seed)
            run_experiment(run_config(study, base, name, seed))


def _part(what: str, chosen: list, available: list) -> list:
    """``chosen``, once every one of them is among the study's ``available`` ones; else ConfigError."""
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise ConfigError(f"{what} {missing} are not in the study; it has {available}")
    return chosen


# ------------------------------------------------------------------------------------------ summary


def aulc(n_labeled: np.ndarray, accuracy: np.ndarray) -> float:
    """Area under the learning curve over its label range, divided by the range: the mean accuracy."""
    n, acc = np.asarray(n_labeled, np.float64), np.asarray(accuracy, np.float64)
    if n.size < 2:
        return float(acc[0])
    return float(np.sum((acc[1:] + acc[:-1]) / 2 * np.diff(n)) / (n[-1] - n[0]))


def summarize(study: StudyConfig, base: Path) -> dict[str, Any]:
    """Learning curves and scores per variant, over the seeds whose run has every round (others are listed);
    with a baseline, each other variant's seed-by-seed comparison with it (`add_paired`)."""
    out: dict[str, Any] = {}
    for name in study.variants:
        curves, seeds, incomplete, hours = [], [], [], 0.0
        for seed in study.seeds:
            cfg = run_config(study, base, name, seed)
            rows = RunDir(cfg.loop.out).metrics()  # the round folders, not metrics.jsonl (derived data)
            if len(rows) != cfg.loop.rounds + 1:
                incomplete.append(seed)
                continue
            curves.append(([m["n_labeled"] for m in rows], [m["test_accuracy"] for m in rows]))
            seeds.append(seed)
            hours += sum(m["round_seconds"] for m in rows) / 3600
        entry: dict[str, Any] = {"seeds": seeds, "incomplete_seeds": incomplete, "overrides": study.variants[name],
                                 "compute_hours": hours}
        if curves:
            n_labeled = curves[0][0]
            if any(c[0] != n_labeled for c in curves):
                raise ValueError(f"variant {name!r}: seeds disagree on the label counts per round")
            entry.update(curve_summary(n_labeled, [c[1] for c in curves]))
        out[name] = entry
    if study.baselines:
        add_paired(out, study.baselines)
    return out


def curve_summary(n_labeled: list[int], accuracy: list[list[float]]) -> dict[str, Any]:
    """The summary of one variant's learning curves (one accuracy list per seed over the label counts
    ``n_labeled``): the curves, their mean and std per round, final accuracy and AULC (mean and std over seeds)."""
    acc = np.array(accuracy, np.float64)
    scores = np.array([aulc(np.array(n_labeled), a) for a in acc])
    return dict(n_labeled=list(n_labeled), accuracy=acc.tolist(), accuracy_mean=acc.mean(0).tolist(),
                accuracy_std=acc.std(0).tolist(), final_mean=float(acc[:, -1].mean()),
                final_std=float(acc[:, -1].std()), aulc_mean=float(scores.mean()), aulc_std=float(scores.std()))


MIN_PAIRED_SEEDS = 2  # a sample std needs two differences


def add_paired(summary: dict[str, Any], baselines: str | list[str]) -> None:
    """Give every variant of ``summary`` but the ``baselines`` either ``paired`` (its `paired` comparison with the
    first baseline that has its settings besides ``scoring.*``, plus that baseline's name) or ``unpaired`` (why
    not: `unpaired_reason` against that baseline, or the first one when none has its settings)."""
    baselines = [baselines] if isinstance(baselines, str) else baselines
    for name, entry in summary.items():
        if name in baselines:
            continue
        same = [b for b in baselines if _settings(summary[b]) == _settings(entry)]
        baseline = (same or baselines)[0]
        reason = unpaired_reason(summary[baseline], entry)
        if reason:
            entry["unpaired"] = reason
        else:
            entry["paired"] = {"baseline": baseline, **paired(summary[baseline], entry)}


def _settings(entry: dict[str, Any]) -> dict[str, Any]:
    """A variant's overrides besides ``scoring.*``: what must match for a seed-by-seed comparison."""
    return {k: v for k, v in entry["overrides"].items() if not k.startswith("scoring.")}


def _shared_seeds(base: dict[str, Any], other: dict[str, Any]) -> list[int]:
    return [s for s in base["seeds"] if s in other["seeds"]]


def unpaired_reason(base: dict[str, Any], other: dict[str, Any]) -> str | None:
    """Why variant ``other`` cannot be compared seed by seed with the baseline ``base`` (summary entries), or None:
    it needs the same settings but for ``scoring.*`` (the same pool and schedule), and MIN_PAIRED_SEEDS finished
    seeds in common with it."""
    if _settings(other) != _settings(base):
        return "other settings than the baseline's besides scoring (its pool or label schedule)"
    if len(_shared_seeds(base, other)) < MIN_PAIRED_SEEDS:
        return f"fewer than {MIN_PAIRED_SEEDS} finished seeds in common with the baseline"
    if other["n_labeled"] != base["n_labeled"]:
        return "another label schedule than the baseline's"
    return None


def paired(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Baseline ``base`` minus variant ``other`` (summary entries with one schedule), seed by seed over the seeds
    both finished: ``seeds`` and, for ``final`` accuracy and ``aulc``, the per-seed ``differences``, their
    ``mean``, sample ``std`` (ddof=1), the standard error of the mean ``se`` = std / sqrt(n), and in how many
    seeds the baseline is ``ahead`` (difference > 0). Fractions, as the accuracies."""
    seeds = _shared_seeds(base, other)
    mine, theirs = _per_seed_scores(base, seeds), _per_seed_scores(other, seeds)
    out: dict[str, Any] = {"seeds": seeds}
    for score in ("final", "aulc"):
        diff = mine[score] - theirs[score]
        std = float(diff.std(ddof=1))
        out[score] = {"differences": diff.tolist(), "mean": float(diff.mean()), "std": std,
                      "se": std / float(np.sqrt(diff.size)), "ahead": int(np.sum(diff > 0))}
    return out


def _per_seed_scores(entry: dict[str, Any], seeds: list[int]) -> dict[str, np.ndarray]:
    """Final accuracy and AULC of ``entry``'s runs of ``seeds``, in that order."""
    acc = np.array([entry["accuracy"][entry["seeds"].index(s)] for s in seeds], np.float64)
    return {"final": acc[:, -1], "aulc": np.array([aulc(np.array(entry["n_labeled"]), a) for a in acc])}


def write_report(study: StudyConfig, summary: dict[str, Any], folder: Path, command: str) -> None:
    """``study.json``, ``study.md`` (table) and ``study.png`` (learning curves) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.json").write_text(json.dumps({"study": dataclasses.asdict(study), "command": command,
                                                   "variants": summary}, indent=1) + "\n")
    (folder / "study.md").write_text(_markdown(study, summary, command))
    _plot(study, summary, folder / "study.png")


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _markdown(study: StudyConfig, summary: dict[str, Any], command: str) -> str:
    lines = ["# Study (generated by ray_dal.loop.study)", "", f"Reproduce: `{command}`", "",
             f"Settings for every run: `{json.dumps(study.settings)}`; seeds {study.seeds}. Test accuracy in %, "
             "mean ± std over the seeds whose run finished (std is the population std).", ""]
    lines += _results_table(study, summary) + [""] + _curve_tables(summary)
    if study.baselines:
        lines += [""] + _paired_table(study.baselines, summary)
    return "\n".join(lines) + "\n"


def _results_table(study: StudyConfig, summary: dict[str, Any]) -> list[str]:
    lines = ["| variant | overrides | seeds | labels at the end | final accuracy | AULC | reference | compute h |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in sorted(summary.items(), key=lambda kv: -kv[1].get("aulc_mean", -1)):
        ref = study.reference.get(name)
        if "n_labeled" not in e:
            lines.append(f"| {name} | `{json.dumps(e['overrides'])}` | 0 (unfinished: {e['incomplete_seeds']}) "
                         "| - | - | - | - | - |")
            continue
        lines.append(f"| {name} | `{json.dumps(e['overrides'])}` | {len(e['seeds'])} | {e['n_labeled'][-1]} | "
                     f"{_pm(e['final_mean'], e['final_std'])} | {_pm(e['aulc_mean'], e['aulc_std'])} | "
                     f"{'-' if ref is None else f'{100 * ref:.2f}'} | {e['compute_hours']:.2f} |")
    return lines + ["", "AULC is the mean accuracy over the label range (trapezoid rule over each round's label "
                    "count); it compares fairly only between variants with the same label schedule (other "
                    "schedules' trapezoids use other points)."]


def _schedules(summary: dict[str, Any]) -> dict[tuple[int, ...], list[str]]:
    """The finished variants of ``summary`` grouped by label schedule (their n_labeled), in summary order."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, e in summary.items():
        if "n_labeled" in e:
            groups.setdefault(tuple(e["n_labeled"]), []).append(name)
    return groups


def _schedule_name(n_labeled: tuple[int, ...]) -> str:
    """E.g. '500 labels, then 10 queries of 100 (1500 at the end)'; the label counts if the steps differ."""
    steps = set(np.diff(n_labeled).tolist())
    if len(steps) != 1:
        return "labels " + ", ".join(map(str, n_labeled))
    queries = len(n_labeled) - 1
    return (f"{n_labeled[0]} labels, then {queries} quer{'y' if queries == 1 else 'ies'} of {steps.pop()} "
            f"({n_labeled[-1]} at the end)")


def _curve_tables(summary: dict[str, Any]) -> list[str]:
    """One learning-curve table per label schedule, each under a line naming the schedule."""
    lines = ["Learning curves (test accuracy % by labels, mean over seeds), one table per label schedule:"]
    for n_labeled, names in _schedules(summary).items():
        lines += ["", f"Schedule: {_schedule_name(n_labeled)}", "",
                  "| variant | " + " | ".join(str(n) for n in n_labeled) + " |", "|---|" + "---|" * len(n_labeled)]
        lines += [f"| {name} | " + " | ".join(f"{100 * a:.2f}" for a in summary[name]["accuracy_mean"]) + " |"
                  for name in names]
    return lines


def _paired_table(baselines: list[str], summary: dict[str, Any]) -> list[str]:
    """The `paired` comparisons in ``summary`` as a table (percentage points), and which variants were left out."""
    rows = [(name, e["paired"]) for name, e in summary.items() if "paired" in e]
    lines = [f"Paired by seed: each variant against the baseline ({', '.join(baselines)}) with its settings besides "
             "scoring (pool, label schedule), baseline minus variant over the seeds both finished, in percentage "
             "points, mean ± SE, where SE is the standard error of the mean paired difference (sample std / sqrt(n), "
             "n = paired seeds).", "",
             "| variant | baseline | seeds (paired) | final: baseline − variant (pp) | AULC: baseline − variant (pp) "
             "| \\|mean\\| > SE? (final) | \\|mean\\| > 2 SE? (final) | \\|mean\\| > SE? (AULC) "
             "| \\|mean\\| > 2 SE? (AULC) | baseline ahead (final) | baseline ahead (AULC) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in rows:
        f, a, n = p["final"], p["aulc"], len(p["seeds"])
        lines.append(f"| {name} | {p['baseline']} | {', '.join(map(str, p['seeds']))} | {_pm_signed(f)} | "
                     f"{_pm_signed(a)} | {_beyond(f, 1)} | {_beyond(f, 2)} | {_beyond(a, 1)} | {_beyond(a, 2)} | "
                     f"{f['ahead']} of {n} | {a['ahead']} of {n} |")
    return lines + _left_out(baselines, summary)


def _left_out(baselines: list[str], summary: dict[str, Any]) -> list[str]:
    """A line naming the variants left out of the paired table, grouped by the reason (none if none were)."""
    reasons: dict[str, list[str]] = {}
    for name, e in summary.items():
        if "unpaired" in e:
            reasons.setdefault(e["unpaired"], []).append(name)
    if not reasons:
        return []
    return ["", f"Left out of the paired table (baselines: {', '.join(baselines)}): "
            + "; ".join(f"{', '.join(names)} ({reason})" for reason, names in reasons.items()) + "."]


def _pm_signed(score: dict[str, Any]) -> str:
    return f"{100 * score['mean']:+.2f} ± {100 * score['se']:.2f}"


def _beyond(score: dict[str, Any], k: int) -> str:
    """'yes' if the mean paired difference is more than ``k`` standard errors away from 0."""
    return "yes" if abs(score["mean"]) > k * score["se"] else "no"


def _plot(study: StudyConfig, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = study.panels or {"all variants": list(study.variants)}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels.items()):
        for name in names:
            e = summary[name]
            if "n_labeled" not in e:
                continue
            n, mean, std = (np.array(e[k]) for k in ("n_labeled", "accuracy_mean", "accuracy_std"))
            ax.plot(n, 100 * mean, marker="o", markersize=3, label=f"{name} (n={len(e['seeds'])})")
            ax.fill_between(n, 100 * (mean - std), 100 * (mean + std), alpha=0.15)
        ax.set(title=title, xlabel="labeled samples", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
