"""Does `ray-dal select` cost grow linearly with the pool, and does its memory stay flat?

For synthetic JPEG pools of 10k, 100k and 1M samples (32x32, `ray_dal.data.write_synthetic_pool` with its
defaults: 100k-row files, 5k-row row groups, no id column; written once under /tmp/ray_dal_bench/synthetic
and reused), this runs the whole human-in-the-loop path as a subprocess:

    ray-dal select --pool POOL --checkpoint cnn.pt --labeled labeled.parquet --budget 500 --out q.parquet \\
        --model cnn --num-scorers 2                      (strategy dynamic, scope all, gamma 2, batch 256)

with a seeded, untrained cnn checkpoint and 500 labeled ids drawn uniformly from the pool (labels from the
pool). Each run starts its own embedded local Ray (RAY_ADDRESS is removed from its environment), so the
measured cost includes Ray's start, G over the 500 labeled samples (`pool_grad_sum`, its own actor pool)
and scoring (`score_pool`).

Measured per run:
  * wall seconds (spawn to exit) and the phases seen in its output: Ray started, the G dataset and the
    scoring dataset ("execution finished in X seconds" lines), and select's own "scored N samples in Xs";
  * memory of the whole process tree, sampled every 0.5 s with psutil: the `ray-dal` process, ALL its
    descendants (raylet, GCS, dashboard/runtime-env agents, log monitor, every Ray worker and actor) and
    any other process whose command line names the Ray session that run started (so a reparented
    process is still counted). We report the peak over samples of the SUM of PSS (proportional set size:
    shared pages, e.g. the plasma object store in /dev/shm mapped by raylet and workers, are split among
    the processes mapping them, so they are counted once), the peak sum of RSS (counts shared pages once
    per process: an over-estimate) and the PSS per process kind at the PSS peak. /dev/shm use and the
    system's shared memory are sampled too (machine-wide: co-tenants' Ray sessions show up there);
  * object spilling: lines of the session's raylet.out that mention spilling.

Targets: time per sample at 1M within 1.2x of 100k, peak PSS at 1M within 1.25x of 100k. Sizes run
interleaved (10k, 100k, 1M, 100k, 10k) so a shared machine's load drifts hit both sides of a ratio.

    python benchmarks/pool_scaling.py --quick     # smoke run (~40 s): 1k and 2k samples, 100 labeled, budget 100
    python benchmarks/pool_scaling.py             # 10k, 100k, 1M (~10 minutes); writes benchmarks/results/pool_scaling.*
    python benchmarks/pool_scaling.py --quick --out /tmp/x   # write NAME.{json,md,png} elsewhere

Object storage: the same select on one pool (100k by default) read from local disk and from a URI, interleaved,
with the throughput ratio in one run (the pool is uploaded to the URI first unless already there):

    python benchmarks/pool_scaling.py --pool-uri s3://bucket/pools/n100000   # AWS_* env as for ray-dal
    python benchmarks/pool_scaling.py --start-moto [--quick]   # a local moto server: loopback, not S3's throughput
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import record  # benchmarks/record.py

REPO = Path(__file__).resolve().parents[1]
ROOT = Path("/tmp/ray_dal_bench")
POOLS = ROOT / "synthetic"
WORK = ROOT / "pool_scaling"
RAY_DAL = Path(sys.executable).with_name("ray-dal")
BUDGET, NUM_LABELED, NUM_SCORERS, MODEL = 500, 500, 2, "cnn"  # --quick: budget and labeled 100
SESSION_RE = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")


# ----------------------------------------------------------------------------------------------------
# inputs (written once under /tmp, reused)


def synthetic_pool(n: int) -> tuple[Path, float | None]:
    """(folder, seconds to write it or None when reused): `write_synthetic_pool(folder, n)` with its defaults."""
    from ray_dal.data import write_synthetic_pool

    path, done = POOLS / f"n{n}", POOLS / f"n{n}.done"
    if done.exists():
        return path, None
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    write_synthetic_pool(path, n)
    seconds = time.perf_counter() - t0
    done.write_text(json.dumps({"num_samples": n, "write_seconds": seconds}))
    return path, seconds


def checkpoint() -> Path:
    path = WORK / "cnn_random_seed0.pt"
    if not path.exists():
        import torch

        from ray_dal.models import build_model

        torch.manual_seed(0)
        torch.save(build_model(MODEL, 10).state_dict(), path)
    return path


def labeled_set(pool: Path, n: int) -> Path:
    """NUM_LABELED (500) ids drawn uniformly (seed 0) from the pool's rows, with the pool's labels."""
    path = WORK / (f"labeled_n{n}.parquet" if NUM_LABELED == 500 else f"labeled_n{n}_m{NUM_LABELED}.parquet")
    if not path.exists():
        ids = np.sort(np.random.default_rng(0).choice(n, NUM_LABELED, replace=False)).astype(np.int64)
        labels = np.concatenate([pq.read_table(f, columns=["label"])["label"].to_numpy()
                                 for f in sorted(pool.glob("*.parquet"))])[ids]
        pq.write_table(pa.table({"id": ids, "label": labels.astype(np.int64)}), path)
    return path


# ----------------------------------------------------------------------------------------------------
# process-tree memory sampling


def kind_of(proc: psutil.Process, root_pid: int, cmd: str) -> str:
    if proc.pid == root_pid:
        return "driver (ray-dal)"
    if "raylet" in cmd:
        return "raylet (+plasma store)"
    if "gcs_server" in cmd:
        return "gcs_server"
    if cmd.startswith("ray::") or "default_worker.py" in cmd:
        return "ray workers/actors"
    if any(a in cmd for a in ("dashboard", "agent", "log_monitor", "monitor.py")):
        return "ray agents/monitors"
    return "other"


def smaps_rollup(pid: int) -> dict[str, int]:
    """Bytes of the kernel's /proc/PID/smaps_rollup fields (Rss, Pss, Pss_Anon, Pss_File, Pss_Shmem, ...)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def plasma_bytes(pid: int) -> dict[tuple[int, int], int]:
    """Allocated bytes of the /dev/shm plasma file(s) a process holds open (the object store), by (dev, inode)."""
    out = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if "/dev/shm/" in target and "plasma" in target:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                out[(st.st_dev, st.st_ino)] = st.st_blocks * 512
        except OSError:
            continue
    return out


class TreeMemory:
    """Samples the memory of a process, its descendants and its Ray session's processes every interval."""

    def __init__(self, root_pid: int, interval_s: float = 0.5):
        self.root = psutil.Process(root_pid)
        self.interval_s = interval_s
        self.sessions: set[str] = set()
        self.seen_pids: set[int] = set()
        self.samples: list[dict] = []
        self.peak = {"total": 0}
        self.peak_pss = self.peak_rss = 0
        self.peak_by_kind = collections.defaultdict(int)
        self.shm0 = shutil.disk_usage("/dev/shm").used
        self.shared0 = psutil.virtual_memory().shared
        self._stop = threading.Event()

    def _procs(self) -> list[psutil.Process]:
        procs = {}
        try:
            procs[self.root.pid] = self.root
            for p in self.root.children(recursive=True):
                procs[p.pid] = p
        except psutil.NoSuchProcess:
            pass
        for p in list(procs.values()):  # learn the session name from the tree's command lines
            try:
                self.sessions.update(SESSION_RE.findall(" ".join(p.cmdline())))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        if self.sessions:
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if p.pid not in procs and any(s in cmd for s in self.sessions):
                    procs[p.pid] = p
        return list(procs.values())

    def sample(self) -> None:
        t = time.perf_counter()
        total_pss = total_rss = total_shmem_pss = 0
        by_kind = collections.defaultdict(int)
        plasma: dict = {}
        n = 0
        for p in self._procs():
            try:
                cmd = " ".join(p.cmdline()) or p.name()
                mi = smaps_rollup(p.pid)
                if "raylet" in cmd:
                    plasma.update(plasma_bytes(p.pid))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                continue
            n += 1
            self.seen_pids.add(p.pid)
            total_pss += mi.get("Pss", 0)
            total_rss += mi.get("Rss", 0)
            total_shmem_pss += mi.get("Pss_Shmem", 0)
            by_kind[kind_of(p, self.root.pid, cmd)] += mi.get("Pss", 0) - mi.get("Pss_Shmem", 0)
        store = sum(plasma.values())
        by_kind["object store (plasma, allocated)"] = store
        total = total_pss - total_shmem_pss + store  # every page once: private + shared files by PSS, shm once
        shm = shutil.disk_usage("/dev/shm").used - self.shm0
        shared = psutil.virtual_memory().shared - self.shared0
        rec = {"t": t, "total": total, "pss": total_pss, "rss": total_rss, "shmem_pss": total_shmem_pss,
               "plasma": store, "procs": n, "dev_shm_delta": shm, "shared_delta": shared, "by_kind": dict(by_kind)}
        self.samples.append(rec)
        if total > self.peak["total"]:
            self.peak = {"total": total, "by_kind": dict(by_kind), "t": t}
        self.peak_pss = max(self.peak_pss, total_pss)
        self.peak_rss = max(self.peak_rss, total_rss)
        for k, v in by_kind.items():
            self.peak_by_kind[k] = max(self.peak_by_kind[k], v)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------------------------
# one `ray-dal select` run


def _read_lines(stream, sink: list, t0: float):
    buf = b""
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = re.split(rb"[\r\n]", buf)
        now = time.perf_counter() - t0
        sink.extend((now, l.decode(errors="replace")) for l in lines if l.strip())
    if buf.strip():
        sink.append((time.perf_counter() - t0, buf.decode(errors="replace")))


def run_select(n: int, rep: int, pool_uri: str | None = None) -> dict:
    """One `ray-dal select` subprocess on the n-sample pool (read from ``pool_uri`` when given: the same pool's copy)."""
    pool, _ = synthetic_pool(n)
    out = WORK / f"query_n{n}_r{rep}{'_uri' if pool_uri else ''}.parquet"
    cmd = [str(RAY_DAL), "select", "--pool", pool_uri or str(pool), "--checkpoint", str(checkpoint()),
           "--labeled", str(labeled_set(pool, n)), "--budget", str(BUDGET), "--out", str(out), "--model", MODEL,
           "--num-scorers", str(NUM_SCORERS), "--no-progress-timeout", "300"]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    load0 = psutil.getloadavg()
    cpu0 = psutil.cpu_times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(WORK))
    mon = TreeMemory(proc.pid)
    mon.start()
    lines: list = []
    readers = [threading.Thread(target=_read_lines, args=(s, lines, t0), daemon=True) for s in (proc.stdout, proc.stderr)]
    for r in readers:
        r.start()
    tree_cpu = {}
    while proc.poll() is None:  # CPU seconds of the tree (last seen value per pid)
        try:
            for p in [mon.root, *mon.root.children(recursive=True)]:
                try:
                    c = p.cpu_times()
                    tree_cpu[p.pid] = c.user + c.system
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    mon.stop()
    for r in readers:
        r.join()
    cpu1 = psutil.cpu_times()
    busy = lambda c: c.user + c.nice + c.system + getattr(c, "irq", 0) + getattr(c, "softirq", 0) + getattr(c, "steal", 0)
    text = "\n".join(l for _, l in lines)
    if proc.returncode != 0:
        raise RuntimeError(f"ray-dal select failed ({proc.returncode}) for n={n}:\n{text[-3000:]}")
    m = re.search(r"scored (\d+) samples in ([\d.]+)s", text)
    num_scored, score_seconds = int(m.group(1)), float(m.group(2))
    phases = {}
    for t, l in lines:
        if "Started a local Ray instance" in l:
            phases.setdefault("ray_started_s", round(t, 2))
    finished = [float(x) for x in re.findall(r"execution finished in ([\d.]+) seconds", text)]
    starts = [round(t, 2) for t, l in lines if "Starting execution of Dataset" in l]
    phases.update(dataset_starts_s=starts, dataset_seconds=finished)
    if len(finished) >= 2:
        phases.update(g_dataset_s=finished[0], score_dataset_s=finished[1])
    spill = []
    for s in mon.sessions:
        log = Path("/tmp/ray") / s / "logs" / "raylet.out"
        if log.exists():
            spill += [l.strip()[:300] for l in log.read_text(errors="replace").splitlines() if "pill" in l]
    trace = [(round(x["t"] - t0, 2), round(x["total"] / 2**20), round(x["pss"] / 2**20), round(x["rss"] / 2**20),
              round(x["plasma"] / 2**20), round(x["dev_shm_delta"] / 2**20),
              {k: round(v / 2**20) for k, v in x["by_kind"].items()}) for x in mon.samples]
    return {
        "n": n, "repeat": rep, "pool": pool_uri or str(pool), "query": out.name, "wall_s": wall,
        "num_scored": num_scored, "score_seconds": score_seconds,
        "wall_us_per_sample": 1e6 * wall / num_scored, "score_us_per_sample": 1e6 * score_seconds / num_scored,
        "samples_per_second_wall": num_scored / wall, "samples_per_second_score": num_scored / score_seconds,
        "phases": phases,
        "peak_total_mib": mon.peak["total"] / 2**20, "peak_pss_mib": mon.peak_pss / 2**20,
        "peak_rss_mib": mon.peak_rss / 2**20,
        "peak_plasma_mib": max((x["plasma"] for x in mon.samples), default=0) / 2**20,
        "at_peak_by_kind_mib": {k: round(v / 2**20, 1) for k, v in mon.peak.get("by_kind", {}).items()},
        "max_by_kind_mib": {k: round(v / 2**20, 1) for k, v in mon.peak_by_kind.items()},
        "peak_dev_shm_delta_mib": max((x["dev_shm_delta"] for x in mon.samples), default=0) / 2**20,
        "peak_shared_delta_mib": max((x["shared_delta"] for x in mon.samples), default=0) / 2**20,
        "processes_counted": len(mon.seen_pids), "max_processes_at_once": max((x["procs"] for x in mon.samples), default=0),
        "samples_taken": len(mon.samples), "ray_sessions": sorted(mon.sessions),
        "spill_log_lines": spill[-5:], "spill_lines": len(spill),
        "tree_cpu_s": round(sum(tree_cpu.values()), 1), "machine_busy_cpu_s": round(busy(cpu1) - busy(cpu0), 1),
        "machine_capacity_cpu_s": round(psutil.cpu_count() * wall, 1), "load_average_before": [round(x, 2) for x in load0],
        "memory_trace": trace[:: max(1, len(trace) // 400)],  # (s, total, pss, rss, plasma, /dev/shm delta, by kind) MiB
        "output_tail": [l for _, l in lines if "scored" in l or "finished" in l or "rror" in l][-6:],
    }


# ----------------------------------------------------------------------------------------------------
# read-ahead check: does capping Ray Data's object-store budget keep the store flat? (in-process score_pool)


def readahead_check(n: int, caps_mib: list[float | None]) -> dict:
    """score_pool on the n-sample pool in this process, once per cap (None = Ray Data's default budget, 50% of
    the object store), sampling the plasma bytes the raylet has allocated every 0.25 s.

    The cap is set the way a fix in `score_pool` would set it: `DataContext.execution_options.resource_limits`
    with ``object_store_memory`` (the dataset copies the current DataContext when it is created).
    """
    import ray
    import torch
    from ray.data import DataContext

    from ray_dal.config import ScoringConfig
    from ray_dal.models import build_model
    from ray_dal.pipeline.pool_scoring import score_pool
    from ray_dal.pipeline.runtime import init_ray
    from ray_dal.scoring import labeled_gradient

    pool, _ = synthetic_pool(n)
    init_ray(num_cpus=psutil.cpu_count(), no_progress_timeout_s=300)
    raylet = next(p for p in psutil.Process().children(recursive=True) if "raylet" in " ".join(p.cmdline()))
    torch.manual_seed(0)
    model = build_model(MODEL, 10).eval()
    g = labeled_gradient(model, (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))))
    cfg = ScoringConfig(num_scorers=NUM_SCORERS)
    ctx = DataContext.get_current()
    default_limits = ctx.execution_options.resource_limits
    out = []
    for cap in caps_mib:
        ctx.execution_options.resource_limits = (default_limits if cap is None else
                                                 default_limits.copy(object_store_memory=int(cap * 2**20)))
        peak, stop = [0], threading.Event()

        def watch():
            while not stop.wait(0.25):
                peak[0] = max(peak[0], sum(plasma_bytes(raylet.pid).values()))

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        q = score_pool(str(pool), model_cfg={"name": MODEL, "num_classes": 10}, state_dict=model.state_dict(),
                       grad_sum=g, scoring_cfg=cfg, budget=BUDGET, exclude_ids=np.empty(0, np.int64), seed=0)
        stop.set()
        th.join()
        out.append({"cap_mib": cap, "peak_object_store_mib": peak[0] / 2**20, "seconds": q.seconds,
                    "samples_per_second": q.samples_per_second, "num_scored": q.num_scored})
        print(f"   cap {cap} MiB: object store peak {peak[0] / 2**20:.0f} MiB, {q.samples_per_second:.0f}/s "
              f"({q.seconds:.1f}s)", flush=True)
    ctx.execution_options.resource_limits = default_limits
    ray.shutdown()
    pool_mib = sum(f.stat().st_size for f in pool.glob("*.parquet")) / 2**20
    return {"n": n, "pool_mib": pool_mib, "runs": out,
            "note": "in-process score_pool (2 scorers, cnn, batch 256), plasma bytes allocated by this session's raylet"}


# ----------------------------------------------------------------------------------------------------
# output


def summarise(runs: list[dict], sizes: list[int]) -> dict:
    med = statistics.median
    out = {}
    for n in sizes:
        rs = [r for r in runs if r["n"] == n]
        out[str(n)] = {k: med([r[k] for r in rs]) for k in (
            "wall_s", "score_seconds", "wall_us_per_sample", "score_us_per_sample", "samples_per_second_wall",
            "samples_per_second_score", "peak_total_mib", "peak_pss_mib", "peak_rss_mib", "peak_plasma_mib",
            "peak_dev_shm_delta_mib", "tree_cpu_s")}
        out[str(n)]["g_dataset_s"] = med([r["phases"].get("g_dataset_s", float("nan")) for r in rs])
        out[str(n)]["runs"] = len(rs)
        kinds = sorted({k for r in rs for k in r["max_by_kind_mib"]})
        out[str(n)]["max_by_kind_mib"] = {k: med([r["max_by_kind_mib"].get(k, 0.0) for r in rs]) for k in kinds}
    big, ref = (str(sizes[-1]), str(sizes[-2])) if len(sizes) >= 2 else (None, None)
    if big:
        b, r = out[big], out[ref]
        out["ratios"] = {
            "pair": f"{big} vs {ref}",
            "wall_time_per_sample": b["wall_us_per_sample"] / r["wall_us_per_sample"],
            "score_time_per_sample": b["score_us_per_sample"] / r["score_us_per_sample"],
            "marginal_wall_per_sample_vs_ref_per_sample": ((b["wall_s"] - r["wall_s"]) / (int(big) - int(ref)) * 1e6)
            / r["wall_us_per_sample"],
            "peak_memory": b["peak_total_mib"] / r["peak_total_mib"],
            "peak_pss": b["peak_pss_mib"] / r["peak_pss_mib"],
            "peak_plasma": b["peak_plasma_mib"] / max(r["peak_plasma_mib"], 1e-9),
            "peak_rss": b["peak_rss_mib"] / r["peak_rss_mib"],
        }
        out["targets"] = {"time_per_sample_within_1.2x": out["ratios"]["wall_time_per_sample"] <= 1.2,
                          "peak_memory_within_1.25x": out["ratios"]["peak_memory"] <= 1.25}
    return out


def write_markdown(result: dict, path: Path) -> None:
    m, s, sm = result["machine"], result["settings"], result["summary"]
    L = ["# Pool scaling of `ray-dal select` (generated by benchmarks/pool_scaling.py)", "",
         f"{m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB (/dev/shm {m['dev_shm_gib']} GiB), "
         f"torch {m['torch']}, ray {m['ray']}, {m['date_utc']}, commit {str(m['git_commit'])[:8]}"
         f"{' (ray_dal modified)' if m['ray_dal_dirty'] else ''}. Load average at start {m['load_average_at_start']} "
         "(shared machine: co-tenant CPU per run is in the JSON).",
         f"Settings: {json.dumps(s)}", "",
         "Whole `ray-dal select` subprocess (own embedded Ray: start + G over 500 labeled + scoring). "
         "Memory = the ray-dal process + all descendants + any process naming its Ray session, sampled every 0.5 s "
         "from /proc/PID/smaps_rollup. **memory** = sum over processes of (Pss - Pss_Shmem) (private pages, shared "
         "library/file pages split fairly) + the bytes allocated in the session's plasma file in /dev/shm (the object "
         "store, read from the raylet's open fd: every object-store page counted once, mapped or not). PSS sum and RSS "
         "sum are given for reference (PSS misses object-store pages no process has mapped; RSS counts shared pages "
         "once per process). Medians over runs.", "",
         "| pool | runs | wall s | scored/s (wall) | wall us/sample | score phase s | scored/s (score) | score us/sample | "
         "G dataset s | peak memory MiB | of which object store | peak PSS sum | peak RSS sum |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in s["sizes"]:
        r = sm[str(n)]
        L.append(f"| {n:,} | {r['runs']} | {r['wall_s']:.1f} | {r['samples_per_second_wall']:.0f} | {r['wall_us_per_sample']:.1f} | "
                 f"{r['score_seconds']:.1f} | {r['samples_per_second_score']:.0f} | {r['score_us_per_sample']:.1f} | "
                 f"{r['g_dataset_s']:.1f} | {r['peak_total_mib']:.0f} | {r['peak_plasma_mib']:.0f} | {r['peak_pss_mib']:.0f} | "
                 f"{r['peak_rss_mib']:.0f} |")
    kinds = sorted({k for n in s["sizes"] for k in sm[str(n)]["max_by_kind_mib"]})
    L += ["", "Largest memory per process kind during the run (MiB, Pss - Pss_Shmem; object store = plasma bytes "
          "allocated; median over runs):", "",
          "| pool | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for n in s["sizes"]:
        L.append(f"| {n:,} | " + " | ".join(f"{sm[str(n)]['max_by_kind_mib'].get(k, 0):.0f}" for k in kinds) + " |")
    if "ratios" in sm:
        r, t = sm["ratios"], sm["targets"]
        L += ["", f"Ratios {r['pair']}: wall time per sample {r['wall_time_per_sample']:.3f} (target <= 1.2: "
              f"{'met' if t['time_per_sample_within_1.2x'] else 'MISSED'}), score-phase time per sample "
              f"{r['score_time_per_sample']:.3f}, marginal wall per extra sample / per-sample at the smaller pool "
              f"{r['marginal_wall_per_sample_vs_ref_per_sample']:.3f}; peak memory {r['peak_memory']:.3f} (target <= 1.25: "
              f"{'met' if t['peak_memory_within_1.25x'] else 'MISSED'}), object store {r['peak_plasma']:.2f}x, "
              f"PSS sum {r['peak_pss']:.3f}, RSS sum {r['peak_rss']:.3f}."]
    rc = result.get("readahead_check")
    if rc:
        L += ["", f"Read-ahead check ({rc['note']}; pool {rc['n']:,} samples, {rc['pool_mib']:.0f} MiB on disk):", "",
              "| Ray Data object-store cap | object store peak MiB | scored/s | seconds |", "|---|---|---|---|"]
        for x in rc["runs"]:
            cap = "default (50% of store)" if x["cap_mib"] is None else f"{x['cap_mib']:.0f} MiB"
            L.append(f"| {cap} | {x['peak_object_store_mib']:.0f} | {x['samples_per_second']:.0f} | {x['seconds']:.1f} |")
    spills = sum(x["spill_lines"] for x in result["runs"])
    L += ["", f"Object spilling: {spills} raylet.out line(s) mention spilling across all runs."]
    if result.get("findings"):
        L += ["", "## Findings", ""] + [f"- {x}" for x in result["findings"]]
    path.write_text("\n".join(L) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, sm, runs = result["settings"], result["summary"], result["runs"]
    sizes = s["sizes"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    ns = np.array(sizes, float)
    ax[0].loglog(ns, [sm[str(n)]["wall_s"] for n in sizes], "o-", label="wall (whole select)")
    ax[0].loglog(ns, [sm[str(n)]["score_seconds"] for n in sizes], "s-", label="score phase")
    ref = sm[str(sizes[-2] if len(sizes) > 1 else sizes[0])]
    ax[0].loglog(ns, ns * ref["wall_us_per_sample"] / 1e6, ":", color="gray", label="linear through 2nd-largest")
    ax[0].set_xlabel("pool size")
    ax[0].set_ylabel("seconds")
    ax[0].legend(fontsize=8)
    ax[0].set_title("time")
    ax[1].semilogx(ns, [sm[str(n)]["wall_us_per_sample"] for n in sizes], "o-", label="wall / sample")
    ax[1].semilogx(ns, [sm[str(n)]["score_us_per_sample"] for n in sizes], "s-", label="score phase / sample")
    ax[1].set_ylim(bottom=0)
    ax[1].set_xlabel("pool size")
    ax[1].set_ylabel("microseconds per sample")
    ax[1].legend(fontsize=8)
    ax[1].set_title("time per sample")
    for n in sizes:
        run = next(r for r in runs if r["n"] == n)
        tr = run["memory_trace"]
        line, = ax[2].plot([x[0] for x in tr], [x[1] for x in tr], label=f"{n:,} memory")
        ax[2].plot([x[0] for x in tr], [x[4] for x in tr], ls=":", color=line.get_color(), label=f"{n:,} object store")
    ax[2].set_xlabel("seconds since spawn")
    ax[2].set_ylabel("MiB")
    ax[2].set_title("process-tree memory over time (first run per size)")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def findings(result: dict) -> list[str]:
    sm, sizes = result["summary"], result["settings"]["sizes"]
    out = []
    for n in sizes:
        r = sm[str(n)]
        out.append(f"{n:,}: wall {r['wall_s']:.1f}s ({r['wall_us_per_sample']:.1f} us/sample, of which the score phase "
                   f"{r['score_seconds']:.1f}s = {r['score_us_per_sample']:.1f} us/sample, G dataset {r['g_dataset_s']:.1f}s); "
                   f"peak memory {r['peak_total_mib']:.0f} MiB (object store {r['peak_plasma_mib']:.0f}; PSS sum "
                   f"{r['peak_pss_mib']:.0f}, RSS sum {r['peak_rss_mib']:.0f}); largest kinds: "
                   + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["max_by_kind_mib"].items(), key=lambda x: -x[1])[:4]))
    return out

# ----------------------------------------------------------------------------------------------------
# the same pool from object storage: --pool-uri (optionally on a moto server this run starts: --start-moto)


def start_moto() -> tuple[object, str]:
    """A moto S3 server on a free local port (tests/s3_server.py), this process's AWS_* env pointed at it, and a bucket."""
    sys.path.insert(0, str(REPO))
    from tests.label_studio_server import free_port
    from tests.s3_server import ENV, S3Server

    port = free_port()
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", port=port, log=WORK / "moto.log")
    os.environ.update(ENV, AWS_ENDPOINT_URL=server.endpoint)
    server.start()
    return server, server.create_bucket("ray-dal-bench")


def upload_pool(local: Path, uri: str) -> float:
    """Copy the pool's Parquet files to ``uri`` unless the same files (names and sizes) are there; seconds taken."""
    import pyarrow.fs as pafs

    from ray_dal.storage import location

    where = location(uri)
    files = sorted(local.glob("*.parquet"))
    have = {f.name: f.size() for f in where.files(".parquet")}
    if have == {f.name: f.stat().st_size for f in files}:
        return 0.0
    t0 = time.perf_counter()
    where.delete()
    pafs.copy_files(str(local), where.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=where.fs)
    return time.perf_counter() - t0


def compare_uri(uri: str | None, n: int, repeats: int, out: Path, stem: str, quick: bool = False) -> dict:
    """`ray-dal select` on the n-sample pool from local disk and from ``uri``, interleaved; ratios of the medians."""
    machine = record.machine_info()
    server = None
    if uri is None:
        server, bucket = start_moto()
        uri = f"s3://{bucket}/synthetic/n{n}"
    try:
        local, _ = synthetic_pool(n)
        upload_s = upload_pool(local, uri)
        store = {"uri": uri, "endpoint": os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
                 "moto_started_here": server is not None, "upload_seconds": upload_s,
                 "bytes": sum(f.stat().st_size for f in local.glob("*.parquet"))}
        runs = []
        for rep in range(repeats):
            for where in (None, uri):
                print(f"[{len(runs) + 1}/{2 * repeats}] ray-dal select on {n:,} samples from {where or local} ...",
                      flush=True)
                r = run_select(n, rep, where)
                r["source"] = "object store" if where else "local disk"
                runs.append(r)
                print(f"   wall {r['wall_s']:.1f}s, scored {r['num_scored']} in {r['score_seconds']:.1f}s "
                      f"({r['samples_per_second_score']:.0f}/s)", flush=True)
    finally:
        if server is not None:
            server.stop()
    agreement = [query_agreement(pq.read_table(WORK / runs[0]["query"]), pq.read_table(WORK / r["query"]))
                 for r in runs]
    med = statistics.median
    summary = {}
    for source in ("local disk", "object store"):
        rs = [r for r in runs if r["source"] == source]
        summary[source] = {k: med([r[k] for r in rs]) for k in (
            "wall_s", "score_seconds", "samples_per_second_score", "samples_per_second_wall", "peak_total_mib")}
    s3, disk = summary["object store"], summary["local disk"]
    summary["ratios"] = {"score_throughput_store_vs_disk": s3["samples_per_second_score"] / disk["samples_per_second_score"],
                         "wall_store_vs_disk": s3["wall_s"] / disk["wall_s"]}
    result = {"machine": machine, "settings": {
        "quick": quick, "n": n, "repeats": repeats, "model": MODEL, "labeled": NUM_LABELED, "budget": BUDGET, "num_scorers": NUM_SCORERS,
        "store": store}, "runs": runs, "agreement_with_first_run": agreement, "summary": summary}
    record.save(result, out, stem, write_uri_markdown, plot_uri)
    return result


def query_agreement(a: pa.Table, b: pa.Table) -> dict:
    """How far two queries of the same pool agree: the share of ids in both, and the largest score difference of
    a shared id relative to the largest score (float32 scoring: batches Ray Data forms differently from run to
    run round differently, and near-tied samples at the budget's edge can swap)."""
    ia, ib = a["id"].to_numpy(), b["id"].to_numpy()
    shared, pa_, pb_ = np.intersect1d(ia, ib, return_indices=True)
    diff = np.abs(a["score"].to_numpy()[pa_] - b["score"].to_numpy()[pb_]).max() if shared.size else float("nan")
    return {"shared_ids": shared.size / ia.size, "max_score_diff_rel": float(diff / np.abs(a["score"].to_numpy()).max()),
            "identical": a.equals(b)}


def write_uri_markdown(result: dict, path: Path) -> None:
    m, s, sm = result["machine"], result["settings"], result["summary"]
    r = sm["ratios"]
    loopback = " a moto server on this machine (loopback: NOT S3's throughput or latency)" if s["store"]["moto_started_here"] \
        else f" {s['store']['endpoint'] or 'AWS S3'}"
    L = ["# `ray-dal select` reading its pool from object storage vs local disk (benchmarks/pool_scaling.py --pool-uri)",
         "", f"{m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB, torch {m['torch']}, ray {m['ray']}, "
         f"pyarrow {m['pyarrow']}, {m['date_utc']}, commit {str(m['git_commit'])[:8]}. Load average at start "
         f"{m['load_average_at_start']}, at end {m.get('load_average_at_end')}.",
         f"Pool: {s['n']:,} synthetic 32x32 JPEGs ({s['store']['bytes'] / 2**20:.0f} MiB of Parquet), from local disk and "
         f"from {s['store']['uri']} on{loopback}. {s['repeats']} interleaved runs per source; medians. Each run's query "
         "against the first run's (ids in both; largest score difference of a shared id / largest score): "
         + "; ".join(f"{r['source']} {a['shared_ids']:.4f}, {a['max_score_diff_rel']:.1e}"
                     for r, a in zip(result["runs"], result["agreement_with_first_run"])) + ".", "",
         "| source | wall s | score phase s | scored/s (score phase) | scored/s (wall) | peak memory MiB |",
         "|---|---|---|---|---|---|"]
    for source in ("local disk", "object store"):
        x = sm[source]
        L.append(f"| {source} | {x['wall_s']:.1f} | {x['score_seconds']:.1f} | "
                 f"{x['samples_per_second_score']:.0f} | {x['samples_per_second_wall']:.0f} | {x['peak_total_mib']:.0f} |")
    L += ["", f"Ratios (object store / local disk): scoring throughput {r['score_throughput_store_vs_disk']:.3f}, "
          f"wall time {r['wall_store_vs_disk']:.3f}."]
    path.write_text("\n".join(L) + "\n")


def plot_uri(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for i, r in enumerate(result["runs"]):
        ax.bar(i, r["samples_per_second_score"], color="tab:blue" if r["source"] == "local disk" else "tab:orange")
    ax.set_xticks(range(len(result["runs"])), [r["source"] for r in result["runs"]], rotation=30, fontsize=7)
    ax.set_ylabel("scored samples / s (score phase)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1k and 2k samples, one run each, 100 labeled, budget 100 "
                        "(~40 s; mostly 2 Ray start-ups)")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--order", type=int, nargs="+", default=None, help="run order (sizes may repeat)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="folder for NAME.json/.md/.png (default benchmarks/results)")
    p.add_argument("--name", default=None, help="output file stem (default pool_scaling[_quick])")
    p.add_argument("--readahead-check", type=Path, default=None, metavar="JSON",
                   help="run the object-store cap check (in-process score_pool on the 100k pool, default vs capped) "
                        "and add it to an existing result JSON (its .md/.png are rewritten)")
    p.add_argument("--replot", type=Path, default=None, metavar="JSON", help="rewrite .md/.png of a result JSON")
    p.add_argument("--pool-uri", default=None, metavar="URI",
                   help="instead: score the pool of --sizes N (default 100k; --quick 2k) from local disk and from URI "
                        "(e.g. s3://bucket/pools/n100000; uploaded there first unless present; AWS_* env as for "
                        "ray-dal), interleaved, and write NAME (default pool_scaling_uri) with the ratio")
    p.add_argument("--start-moto", action="store_true",
                   help="with --pool-uri omitted: start a local moto S3 server and use a bucket on it")
    p.add_argument("--repeats", type=int, default=2, help="--pool-uri/--start-moto: runs per source [%(default)s]")
    a = p.parse_args(argv)
    if a.readahead_check or a.replot:
        path = a.readahead_check or a.replot
        result = json.loads(path.read_text())
        if a.readahead_check:
            n = 100_000 if not result["settings"]["quick"] else 10_000
            result["readahead_check"] = readahead_check(n, [None, 16.0])
        result["findings"] = findings(result)
        path.write_text(json.dumps(result, indent=1, default=float))
        write_markdown(result, path.with_suffix(".md"))
        plot(result, path.with_suffix(".png"))
        return
    global BUDGET, NUM_LABELED
    if a.quick:  # smoke run: same code paths, less to label and score (Ray's start-up dominates anyway)
        BUDGET = NUM_LABELED = 100
    if a.pool_uri or a.start_moto:
        WORK.mkdir(parents=True, exist_ok=True)
        n = (a.sizes or [2_000 if a.quick else 100_000])[0]
        stem = a.name or ("pool_scaling_uri_quick" if a.quick else "pool_scaling_uri")
        r = compare_uri(a.pool_uri, n, 1 if a.quick else a.repeats, a.out, stem, a.quick)
        print(json.dumps(r["summary"]["ratios"], indent=1), json.dumps(r["agreement_with_first_run"]))
        print(f"wrote {a.out / stem}.json/.md/.png")
        return
    sizes = sorted(a.sizes or ([1_000, 2_000] if a.quick else [10_000, 100_000, 1_000_000]))
    order = a.order or (sizes if a.quick else [sizes[0], sizes[1], sizes[2], sizes[1], sizes[0]] if len(sizes) == 3 else sizes)
    WORK.mkdir(parents=True, exist_ok=True)
    POOLS.mkdir(parents=True, exist_ok=True)
    machine = record.machine_info(dev_shm_gib=round(shutil.disk_usage("/dev/shm").total / 2**30, 1))
    pool_write = {}
    for n in sizes:
        path, seconds = synthetic_pool(n)
        pool_write[str(n)] = {"path": str(path), "write_seconds": seconds,
                              "bytes": sum(f.stat().st_size for f in path.glob("*.parquet")),
                              "files": len(list(path.glob("*.parquet")))}
        print(f"pool {n:,}: {path} ({pool_write[str(n)]['bytes'] / 2**20:.0f} MiB, "
              f"{'written in %.1fs' % seconds if seconds else 'reused'})", flush=True)
    settings = {"quick": a.quick, "sizes": sizes, "order": order, "model": MODEL, "checkpoint": "seeded random cnn",
                "labeled": NUM_LABELED, "budget": BUDGET, "num_scorers": NUM_SCORERS, "strategy": "dynamic",
                "scope": "all", "gamma": 2.0, "batch_size": 256, "cpus_per_scorer": 0.5,
                "pool_format": "write_synthetic_pool defaults: 32x32 JPEG, 100k rows/file, 5k rows/row group, no id column",
                "pools": pool_write, "sample_interval_s": 0.5}
    runs = []
    for i, n in enumerate(order):
        rep = sum(1 for r in runs if r["n"] == n)
        print(f"[{i + 1}/{len(order)}] ray-dal select on {n:,} samples ...", flush=True)
        r = run_select(n, rep)
        runs.append(r)
        print(f"   wall {r['wall_s']:.1f}s, scored {r['num_scored']} in {r['score_seconds']:.1f}s "
              f"({r['samples_per_second_score']:.0f}/s), {r['wall_us_per_sample']:.1f} us/sample wall; peak memory "
              f"{r['peak_total_mib']:.0f} MiB (object store {r['peak_plasma_mib']:.0f}, PSS sum {r['peak_pss_mib']:.0f}, "
              f"RSS sum {r['peak_rss_mib']:.0f}), /dev/shm +{r['peak_dev_shm_delta_mib']:.0f} MiB; "
              f"{r['processes_counted']} processes; co-tenant CPU "
              f"{max(0, r['machine_busy_cpu_s'] - r['tree_cpu_s']):.0f}s of {r['machine_capacity_cpu_s']:.0f}", flush=True)
    result = {"machine": machine, "settings": settings, "runs": runs, "summary": summarise(runs, sizes)}
    result["findings"] = findings(result)
    stem = a.name or ("pool_scaling_quick" if a.quick else "pool_scaling")
    record.save(result, a.out, stem, write_markdown, plot)
    print("\n".join(result["findings"]))
    if "ratios" in result["summary"]:
        print(json.dumps(result["summary"]["ratios"], indent=1), json.dumps(result["summary"]["targets"]))
    print(f"wrote {a.out / stem}.json/.md/.png")


if __name__ == "__main__":
    main()
