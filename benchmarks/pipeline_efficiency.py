"""How much of the scoring engine's speed survives the Ray Data pipeline?

End to end, `ray_dal.pipeline.pool_scoring.score_pool` (strategy dynamic, scope all) streams a Parquet pool of
encoded JPEGs through read tasks -> k `PoolScorer` actors (decode, score, per-batch top-b) -> the
driver's top-b merge. Its rate (samples scored / wall seconds, actor start-up included) is compared
with k x the in-process rate of `ray_dal.scoring.dynamic_scores` on pre-decoded tensors. Every run is a pass
with its own actors (``scoring.scorer_lifetime: pass``, so that each repeat pays the start-up a fresh pass
pays). ``--lifetime run`` measures the default instead, the run's warm actors: one untimed pass per k starts
them, then every timed pass reuses them (a round mid-run); round by round they are in round_time.py.

    efficiency = pipeline rate / (k x in-process score rate)

"Same threads per actor": a scorer actor reserves ``cpus_per_scorer`` CPUs (0.5, the default) and sets
torch to max(1, int(0.5)) = 1 thread (`ray_dal.pipeline.actors.use_cpu_share`). So the in-process baseline runs in
this (driver) process with ``torch.set_num_threads(1)``, the same model, weights, G, batch size and
gamma. The baseline is timed right before and right after every pipeline run (the pipeline run is
compared with the mean of its two neighbours) so a shared machine's load hits both alike; we report
medians over repeats.

Diagnostics recorded next to every run, to explain a miss:
  * decode cost: `preprocess_batch` (PIL decode + normalise) per batch, in-process, same thread count.
    A scorer actor decodes and scores serially in one thread, so its ceiling is
    1 / (t_score + t_decode) per sample: ``decode_bound`` = t_score / (t_score + t_decode).
  * a k-process baseline (k > 1): k fresh processes with 1 torch thread each scoring at the same time
    (what this machine gives k concurrent single-thread scorers right now, co-tenants included).
  * start-up: seconds from the call to the first scored block reaching the driver (actor start +
    model/G fetch + first read + one block), Ray's timeline of the actors' __init__ and submit tasks,
    the steady rate after the last actor is ready, and the actors' in-task rate (samples / time busy).
  * CPU accounting: CPU-seconds of every process of the Ray session (sampled with psutil), split into
    scorer actors, read tasks, raylet/GCS, driver and others, plus the whole machine's busy CPU
    (so co-tenant load is visible). Actor utilisation = actor CPU-s / (k x wall).
  * (full mode) a py-spy profile of one scorer actor during an extra, untimed run: share of its
    samples in decode, dynamic_scores, top-b and waiting for input.
  * decode paths: `preprocess_batch` (JPEGs through libjpeg-turbo, the op behind torchvision.io.decode_jpeg) against PIL decoding every image,
    with pixel agreement.

    python benchmarks/pipeline_efficiency.py --quick    # smoke run (~20 s): cnn, 1536 real images, 1 repeat
    python benchmarks/pipeline_efficiency.py            # full: cnn on CIFAR-10 train (50k), resnet18 on 640 images
    python benchmarks/pipeline_efficiency.py --lifetime run --models cnn   # warm actors: pipeline_efficiency_warm
    python benchmarks/pipeline_efficiency.py --quick --out /tmp/x --data-dir ../shared/data/cifar10

CIFAR-10 is read from --data-dir (default ../shared/data/cifar10 beside the repo: train.parquet, test.parquet).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import ray
import record  # benchmarks/record.py
import torch

import ray_dal.pipeline.pool_scoring as pool_scoring
from ray_dal.config import ScoringConfig
from ray_dal.data import decode_images, inspect_pool, normalize, preprocess_batch
from ray_dal.data.transforms import _decode_pil
from ray_dal.models import build_model
from ray_dal.pipeline.runtime import init_ray
from ray_dal.pipeline.scorer_pool import release_scorers
from ray_dal.scoring import dynamic_scores, labeled_gradient
from ray_dal.topk import TopB

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"  # --data-dir
TMP = Path("/tmp/ray_dal_bench/pipeline_efficiency")
GAMMA = 2.0
CPUS_PER_SCORER = 0.5
THREADS_PER_ACTOR = max(1, int(CPUS_PER_SCORER))  # what ray_dal.pipeline.actors.use_cpu_share gives the actor


# ----------------------------------------------------------------------------------------------------
# pools and models


def cifar_subset(n: int, rows_per_group: int) -> Path:
    """The first n rows of CIFAR-10 train (image, label) as one Parquet file under /tmp (reused)."""
    path = TMP / f"cifar10_train_{n}_rg{rows_per_group}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pq.read_table(CIFAR / "train.parquet", columns=["image", "label"]).slice(0, n)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp, row_group_size=rows_per_group, compression="none")
        os.replace(tmp, path)
    return path


def synthetic_pool(n: int) -> Path:
    """A synthetic JPEG pool of n rows (ray_dal.data.write_synthetic_pool defaults), written once under /tmp."""
    from ray_dal.data import write_synthetic_pool
    root = Path("/tmp/ray_dal_bench/synthetic")
    path, done = root / f"n{n}", root / f"n{n}.done"
    if not done.exists():
        shutil.rmtree(path, ignore_errors=True)
        write_synthetic_pool(path, n)
        done.write_text(json.dumps({"num_samples": n}))
    return path


def sample_batches_any(pool: Path) -> Path:
    """The first Parquet file of a pool (file or folder)."""
    return pool if pool.is_file() else sorted(pool.glob("*.parquet"))[0]


def model_and_g(name: str, seed: int = 0):
    """A seeded (untrained) model in eval mode and G summed over 500 CIFAR-10 test images."""
    torch.manual_seed(seed)
    model = build_model(name, 10).eval()
    test = pq.read_table(CIFAR / "test.parquet", columns=["image", "label"]).slice(0, 500)
    x = normalize(decode_images(test["image"].to_pylist())[0])
    y = torch.tensor(test["label"].to_pylist())
    g = labeled_gradient(model, [(x[i:i + 100], y[i:i + 100]) for i in range(0, 500, 100)])
    return model, g


def sample_batches(pool: Path, batch_size: int, n_batches: int) -> list[dict]:
    """n_batches batches of (id, encoded image) from the pool's first row group(s), plus decoded x."""
    pf = pq.ParquetFile(sample_batches_any(pool))
    table = pf.read_row_groups(list(range(min(pf.metadata.num_row_groups, 4))), columns=["image"])
    blobs = np.array(table["image"].to_pylist(), dtype=object)
    out = []
    for i in range(n_batches):
        idx = np.arange(i * batch_size, (i + 1) * batch_size) % len(blobs)
        batch = {"id": idx.astype(np.int64), "image": blobs[idx]}
        out.append({"raw": batch, "x": torch.from_numpy(preprocess_batch(batch)["x"])})
    return out


# ----------------------------------------------------------------------------------------------------
# in-process baselines


def inprocess_rates(model, g, batches: list[dict], threads: int, repeats: int) -> dict:
    """Median per-batch seconds of dynamic_scores (pre-decoded) and of preprocess_batch, with `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dynamic_scores(model, batches[0]["x"], g, gamma=GAMMA)  # warm-up
        score_s, decode_s = [], []
        for _ in range(repeats):
            for b in batches:
                t0 = time.perf_counter()
                dynamic_scores(model, b["x"], g, gamma=GAMMA, scope="all")
                score_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                preprocess_batch(b["raw"])
                decode_s.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    bs = len(batches[0]["raw"]["id"])
    s, d = statistics.median(score_s), statistics.median(decode_s)
    return {"score_rate": bs / s, "decode_rate": bs / d, "decode_plus_score_rate": bs / (s + d),
            "score_s_per_batch": s, "decode_s_per_batch": d, "decode_over_score": d / s, "n": len(score_s)}


def _parallel_worker(args):
    name, state, g, x, n_batches, threads, start_at = args
    torch.set_num_threads(threads)
    model = build_model(name, 10).eval()
    model.load_state_dict(state)
    x = torch.from_numpy(x)
    dynamic_scores(model, x, g, gamma=GAMMA)  # warm-up
    while time.time() < start_at:
        time.sleep(0.005)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        dynamic_scores(model, x, g, gamma=GAMMA)
    return x.shape[0] * n_batches / (time.perf_counter() - t0)


def parallel_rate(name: str, model, g, x: torch.Tensor, k: int, threads: int, n_batches: int,
                  start_s: float = 8.0) -> dict:
    """k fresh processes (spawn), `threads` torch threads each, scoring the same batch at the same time."""
    ctx = mp.get_context("spawn")
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with ctx.Pool(k) as pool:
        start_at = time.time() + start_s  # every worker imported torch and warmed up by then
        rates = pool.map(_parallel_worker, [(name, state, g, x.numpy(), n_batches, threads, start_at)] * k)
    return {"k": k, "sum_rate": float(sum(rates)), "per_process": [float(r) for r in rates]}


# ----------------------------------------------------------------------------------------------------
# CPU accounting of the Ray session


def _category(proc_name: str, cmdline: str, pid: int) -> str:
    if pid == os.getpid():
        return "driver"
    text = proc_name + " " + cmdline
    if "PoolScorer" in text or "ScorerActor" in text:
        return "scorer_actors"
    if "ReadPool" in text or "ReadReadPool" in text:
        return "read_tasks"
    if "raylet" in text:
        return "raylet"
    if "gcs_server" in text:
        return "gcs"
    if text.startswith("ray::"):
        return "other_ray_workers"
    return "other"


class CpuMonitor:
    """Samples CPU times of this process and all its descendants (the embedded Ray session) every interval."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.me = psutil.Process()

    def _sample(self):
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    name = p.name()
                    cmd = " ".join(p.cmdline()[:3])
                cpu = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            last = self.last.get(p.pid)
            cat = _category(name, cmd, p.pid)
            if last is not None:
                self.by_cat[cat] += max(0.0, cpu - last)
            else:
                self.by_cat[cat] += 0.0
            self.last[p.pid] = cpu

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self):
        self.last, self.by_cat = {}, collections.defaultdict(float)
        self.sys0 = psutil.cpu_times()
        self._sample()
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall = time.perf_counter() - self.t0
        s1 = psutil.cpu_times()
        busy = lambda t: t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
        self.machine_busy_cpu_s = busy(s1) - busy(self.sys0)
        self.ours_cpu_s = sum(self.by_cat.values())
        return False

    def summary(self) -> dict:
        cores = psutil.cpu_count()
        return {
            "wall_s": self.wall,
            "cpu_s_by_process": {k: round(v, 3) for k, v in sorted(self.by_cat.items())},
            "session_cpu_s": round(self.ours_cpu_s, 3),
            "machine_busy_cpu_s": round(self.machine_busy_cpu_s, 3),
            "co_tenant_cpu_s": round(max(0.0, self.machine_busy_cpu_s - self.ours_cpu_s), 3),
            "machine_capacity_cpu_s": round(cores * self.wall, 3),
        }


# ----------------------------------------------------------------------------------------------------
# the pipeline


class TimedTopB(TopB):
    """`TopB` that also records when each block of scored samples reached the driver (time, rows)."""

    log: list = []

    def add(self, ids, scores, **columns):
        TimedTopB.log.append((time.perf_counter(), len(ids)))
        return super().add(ids, scores, **columns)


def run_pipeline(pool: Path, name: str, model, g, k: int, batch_size: int, budget: int, lifetime: str = "pass") -> dict:
    """One `score_pool` call; budget >= batch_size so every scored row of a batch reaches the merge."""
    assert budget >= batch_size
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    cfg = ScoringConfig(strategy="dynamic", gamma=GAMMA, scope="all", num_scorers=k, batch_size=batch_size,
                        cpus_per_scorer=CPUS_PER_SCORER, gpus_per_scorer=0, scorer_lifetime=lifetime)
    TimedTopB.log = []
    pool_scoring.TopB = TimedTopB
    try:
        with CpuMonitor() as mon:
            t0, t0_wall = time.perf_counter(), time.time()
            q = pool_scoring.score_pool(str(pool), model_cfg={"name": name, "num_classes": 10}, state_dict=state,
                                        grad_sum=g, scoring_cfg=cfg, budget=budget,
                                        exclude_ids=np.empty(0, np.int64), seed=0)
            t_end = time.perf_counter()
    finally:
        pool_scoring.TopB = TopB
    log = TimedTopB.log
    rows = sum(n for _, n in log)
    assert rows == q.num_scored, (rows, q.num_scored)
    first_t, first_n = log[0]
    steady = (rows - first_n) / (log[-1][0] - first_t) if len(log) > 1 and log[-1][0] > first_t else float("nan")
    cpu = mon.summary()
    cpu["scorer_actor_utilisation"] = round(cpu["cpu_s_by_process"].get("scorer_actors", 0.0) / (k * q.seconds), 3)
    tl = timeline_summary(t0_wall, t_end - t0, k)
    if tl.get("status") == "ok":  # after every actor is ready: robust even with few output blocks
        steady_tl = q.num_scored / max(1e-9, (t_end - t0) - tl["actor_ready_s"])
        busy_rate = q.num_scored / (sum(tl["submit_s_per_actor"]) / k)
    else:
        steady_tl = busy_rate = float("nan")
    return {
        "k": k, "num_scored": q.num_scored, "seconds": q.seconds, "rate": q.samples_per_second,
        "call_seconds": t_end - t0, "first_block_s": first_t - t0, "blocks": len(log), "steady_rate": steady_tl,
        "steady_rate_blocks": steady, "in_task_rate": busy_rate,
        "progress": [(round(t - t0, 3), n, int(c)) for (t, n), c in zip(log, np.cumsum([n for _, n in log]))][
            :: max(1, len(log) // 200)],  # (seconds, rows in block, rows so far)
        "cpu": cpu, "timeline": tl,
    }


def timeline_summary(t0_wall: float, wall: float, k: int) -> dict:
    """From Ray's task timeline: when the scorer actors started and how busy they were after start-up.

    ``actor_init_*``: the actor's ``__init__`` task (unpickling PoolScorer imports torch and ray_dal,
    then the model and G are loaded). ``busy_after_init`` = time inside the actors' ``submit`` tasks
    (decode + score + top-b of one input block) / (k x (wall - end of the last __init__)): below 1 means
    an actor sat waiting for input or for the driver.
    """
    try:
        events = [e for e in ray.timeline() if e.get("ph") == "X" and e["ts"] >= t0_wall * 1e6]
    except Exception as error:  # noqa: BLE001
        return {"status": f"timeline failed: {error}"}
    rel = lambda e: (e["ts"] / 1e6 - t0_wall, e["dur"] / 1e6)
    init = [rel(e) for e in events if e.get("cat", "").endswith(("PoolScorer)).__init__", "ScorerActor.__init__"))]
    submit = collections.defaultdict(list)
    for e in events:
        if e.get("cat", "").endswith(("PoolScorer)).submit", "ScorerActor.run")):
            submit[e["tid"]].append(rel(e))
    reads = [rel(e) for e in events if e.get("cat", "") == "task::ReadReadPool"]
    if not submit:
        return {"status": "no scorer events"}
    if not init:  # warm actors (lifetime "run"): started by an earlier pass, ready from the call on
        init = [(0.0, 0.0)] * len(submit)
    init_end = max(a + d for a, d in init)
    busy = sum(d for v in submit.values() for _, d in v)
    first_submit = min(a for v in submit.values() for a, _ in v)
    return {
        "status": "ok", "actors": len(init), "actor_init_start_s": round(min(a for a, _ in init), 3),
        "actor_init_s": [round(d, 3) for _, d in init], "actor_ready_s": round(init_end, 3),
        "first_submit_s": round(first_submit, 3), "submit_tasks": sum(len(v) for v in submit.values()),
        "submit_s_per_actor": [round(sum(d for _, d in v), 3) for v in submit.values()],
        "busy_after_init": round(busy / (k * max(1e-9, wall - init_end)), 3),
        "read_tasks": len(reads), "read_task_s_total": round(sum(d for _, d in reads), 3),
        "last_submit_end_s": round(max(a + d for v in submit.values() for a, d in v), 3),
    }


# ----------------------------------------------------------------------------------------------------
# py-spy profile of one actor


def _scorer_pids() -> list[int]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "PoolScorer" in p.name() + " ".join(p.cmdline()[:2]):
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def profile_actor(pool: Path, name: str, model, g, k: int, batch_size: int, budget: int, seconds: float) -> dict:
    """An extra, untimed pipeline run; py-spy records one scorer actor for `seconds` (raw collapsed stacks)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        return {"status": "py-spy not found"}
    out_file = TMP / f"pyspy_{name}_k{k}.txt"
    result: dict = {}

    def record():
        deadline = time.time() + 60
        pids = []
        while time.time() < deadline and len(pids) < k:
            time.sleep(0.2)
            pids = _scorer_pids()
        if not pids:
            result["status"] = "no scorer actor found"
            return
        time.sleep(1.0)  # past model load
        proc = subprocess.run([pyspy, "record", "--pid", str(pids[0]), "--duration", str(int(seconds)), "--rate", "100",
                               "--format", "raw", "--idle", "--threads", "--nonblocking", "--output", str(out_file)],
                              capture_output=True, text=True)
        result["returncode"] = proc.returncode
        result["stderr_tail"] = proc.stderr[-500:]

    th = threading.Thread(target=record, daemon=True)
    th.start()
    run = run_pipeline(pool, name, model, g, k, batch_size, budget)
    th.join()
    if not out_file.exists():
        result.setdefault("status", "py-spy wrote nothing")
        return result
    return {**result, **summarise_pyspy(out_file.read_text()), "run": {x: run[x] for x in ("rate", "seconds", "k")}}


PHASES = [  # first match wins, checked against the whole stack
    ("decode", ("decode_images", "_decode_pil", "_decode_jpeg", "preprocess_batch", "normalize")),
    ("dynamic_scores", ("dynamic_scores",)),
    ("top_b", ("top_b",)),
    ("exclude_isin", ("isin",)),
    ("scorer_other", ("_top_of",)),
]


def summarise_pyspy(text: str) -> dict:
    """Shares of the main thread's samples by phase; the rest is Ray's own loop (mostly waiting for a batch)."""
    threads = collections.Counter()
    by_thread = collections.defaultdict(collections.Counter)
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        thread = stack.split(";", 1)[0]
        threads[thread] += count
        phase = next((p for p, keys in PHASES if any(k in stack for k in keys)), None)
        if phase is None:
            idle = any(w in stack for w in ("wait", "get_objects", "recv", "select", "poll", "sleep", "acquire"))
            phase = "ray_waiting" if idle else "ray_other"
        by_thread[thread][phase] += count
    # the thread that runs the user function is the one holding the scorer's samples
    main = max(by_thread, key=lambda t: sum(by_thread[t][p] for p, _ in PHASES), default=None)
    if main is None:
        return {"status": "no samples"}
    total = sum(by_thread[main].values())
    return {"status": "ok", "thread": main, "samples": total,
            "share": {p: round(c / total, 3) for p, c in by_thread[main].most_common()}}


# ----------------------------------------------------------------------------------------------------
# decode alternatives


def decode_alternatives(pool: Path, batch_size: int, repeats: int) -> dict:
    """`preprocess_batch` (JPEGs through libjpeg-turbo, the op behind torchvision.io.decode_jpeg) vs the same with PIL decoding every image, 1 thread."""
    blobs = pq.ParquetFile(sample_batches_any(pool)).read_row_group(0, columns=["image"])["image"].to_pylist()[:batch_size]
    batch = {"id": np.arange(len(blobs)), "image": np.array(blobs, dtype=object)}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    pil_s, tv_s = [], []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            x = preprocess_batch(batch)["x"]
            tv_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pil_pixels = np.stack([_decode_pil(b) for b in blobs])
            ref = normalize(pil_pixels).numpy()
            pil_s.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    diff = np.abs(pil_pixels.astype(np.int16) - decode_images(blobs)[0].astype(np.int16))
    return {"status": "ok", "batch_size": len(blobs), "pil_us_per_image": 1e6 * statistics.median(pil_s) / len(blobs),
            "torchvision_us_per_image": 1e6 * statistics.median(tv_s) / len(blobs),
            "speedup": statistics.median(pil_s) / statistics.median(tv_s),
            "max_abs_pixel_diff": int(diff.max()), "fraction_pixels_differ": float((diff > 0).mean()),
            "max_abs_x_diff": float(np.abs(ref - x).max())}


# ----------------------------------------------------------------------------------------------------
# main experiment


def study(name: str, pool: Path, batch_size: int, ks: list[int], repeats: int, base_batches: int,
          base_repeats: int, parallel_batches: int, budget: int, profile_s: float,
          parallel_start_s: float = 8.0, lifetime: str = "pass") -> dict:
    print(f"\n== {name}: pool {pool} ({inspect_pool(str(pool)).num_rows} rows), batch {batch_size}, k {ks}", flush=True)
    model, g = model_and_g(name)
    batches = sample_batches(pool, batch_size, base_batches)
    T = THREADS_PER_ACTOR

    def baseline():
        return inprocess_rates(model, g, batches, T, base_repeats)

    runs, bases, warm_k, first_passes = [], [baseline()], None, {}
    for rep in range(repeats):
        order = ks if rep % 2 == 0 else ks[::-1]
        for k in order:
            if lifetime == "run" and k != warm_k:  # a pool of k actors starts: untimed, like a run's first pass
                first = run_pipeline(pool, name, model, g, k, batch_size, budget, lifetime)
                first_passes.setdefault(str(k), []).append({x: first[x] for x in ("rate", "seconds")})
                warm_k = k
            run = run_pipeline(pool, name, model, g, k, batch_size, budget, lifetime)
            after = baseline()
            around = [bases[-1], after]
            bases.append(after)
            ref = statistics.mean(b["score_rate"] for b in around)
            ref_dec = statistics.mean(b["decode_plus_score_rate"] for b in around)
            run.update(repeat=rep, inprocess_score_rate=ref, inprocess_decode_plus_score_rate=ref_dec,
                       efficiency=run["rate"] / (k * ref), steady_efficiency=run["steady_rate"] / (k * ref),
                       efficiency_vs_decode_plus_score=run["rate"] / (k * ref_dec))
            if k > 1 and parallel_batches:
                par = parallel_rate(name, model, g, batches[0]["x"], k, T, parallel_batches, parallel_start_s)
                run["parallel_inprocess"] = par
                run["efficiency_vs_parallel"] = run["rate"] / par["sum_rate"]
            runs.append(run)
            print(f"  rep {rep} k={k}: {run['rate']:.0f}/s (steady {run['steady_rate']:.0f}/s), in-process {ref:.0f}/s "
                  f"-> efficiency {run['efficiency']:.3f} (steady {run['steady_efficiency']:.3f}); first block "
                  f"{run['first_block_s']:.2f}s (actors ready {run['timeline'].get('actor_ready_s', float('nan')):.2f}s, busy after "
                  f"init {run['timeline'].get('busy_after_init', float('nan')):.2f}); actor util {run['cpu']['scorer_actor_utilisation']:.2f}; "
                  f"co-tenant CPU {run['cpu']['co_tenant_cpu_s']:.1f}s of {run['cpu']['machine_capacity_cpu_s']:.1f}"
                  + (f"; k-process baseline {run['parallel_inprocess']['sum_rate']:.0f}/s" if "parallel_inprocess" in run else ""),
                  flush=True)

    med = lambda xs: statistics.median(xs) if xs else float("nan")
    summary = {}
    for k in ks:
        rk = [r for r in runs if r["k"] == k]
        summary[str(k)] = {
            "rate": med([r["rate"] for r in rk]), "steady_rate": med([r["steady_rate"] for r in rk]),
            "in_task_rate": med([r["in_task_rate"] for r in rk]),
            "inprocess_score_rate": med([r["inprocess_score_rate"] for r in rk]),
            "inprocess_decode_plus_score_rate": med([r["inprocess_decode_plus_score_rate"] for r in rk]),
            "efficiency": med([r["efficiency"] for r in rk]), "steady_efficiency": med([r["steady_efficiency"] for r in rk]),
            "efficiency_vs_decode_plus_score": med([r["efficiency_vs_decode_plus_score"] for r in rk]),
            "efficiency_vs_parallel": med([r["efficiency_vs_parallel"] for r in rk if "efficiency_vs_parallel" in r]),
            "parallel_inprocess_rate": med([r["parallel_inprocess"]["sum_rate"] for r in rk if "parallel_inprocess" in r]),
            "first_block_s": med([r["first_block_s"] for r in rk]),
            "actor_init_start_s": med([r["timeline"]["actor_init_start_s"] for r in rk if r["timeline"].get("status") == "ok"]),
            "actor_init_s": med([max(r["timeline"]["actor_init_s"]) for r in rk if r["timeline"].get("status") == "ok"]),
            "actor_ready_s": med([r["timeline"]["actor_ready_s"] for r in rk if r["timeline"].get("status") == "ok"]),
            "busy_after_init": med([r["timeline"]["busy_after_init"] for r in rk if r["timeline"].get("status") == "ok"]),
            "read_task_s_total": med([r["timeline"]["read_task_s_total"] for r in rk if r["timeline"].get("status") == "ok"]),
            "seconds": med([r["seconds"] for r in rk]),
            "scorer_actor_utilisation": med([r["cpu"]["scorer_actor_utilisation"] for r in rk]),
            "cpu_s_by_process": {c: med([r["cpu"]["cpu_s_by_process"].get(c, 0.0) for r in rk])
                                 for c in sorted({c for r in rk for c in r["cpu"]["cpu_s_by_process"]})},
            "co_tenant_cpu_s": med([r["cpu"]["co_tenant_cpu_s"] for r in rk]),
            "machine_capacity_cpu_s": med([r["cpu"]["machine_capacity_cpu_s"] for r in rk]),
            "n": len(rk),
        }
    if len(ks) > 1 and all(str(k) in summary for k in (1, 2)):
        summary["speedup_2_vs_1"] = summary["2"]["rate"] / summary["1"]["rate"]
        summary["steady_speedup_2_vs_1"] = summary["2"]["steady_rate"] / summary["1"]["steady_rate"]
    decode_over_score = med([b["decode_over_score"] for b in bases])
    release_scorers()
    out = {"model": name, "pool": str(pool), "pool_rows": inspect_pool(str(pool)).num_rows, "lifetime": lifetime,
           "first_passes": first_passes,
           "row_groups": len(inspect_pool(str(pool)).row_groups), "batch_size": batch_size, "budget": budget,
           "threads_per_actor": T, "baselines": bases, "runs": runs, "summary": summary,
           "decode_over_score": decode_over_score, "decode_bound": 1.0 / (1.0 + decode_over_score)}
    if profile_s and lifetime == "pass":
        kp = max(ks)
        print(f"  profiling one scorer actor (k={kp}) with py-spy for {profile_s:.0f}s (untimed run)", flush=True)
        out["pyspy"] = profile_actor(pool, name, model, g, kp, batch_size, budget, profile_s)
        print(f"  py-spy: {out['pyspy'].get('share', out['pyspy'])}", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------
# output


def f(x, nd=0):
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/m"
    return f"{x:.{nd}f}"


def write_markdown(result: dict, path: Path) -> None:
    m, s = result["machine"], result["settings"]
    L = ["# Pipeline efficiency (generated by benchmarks/pipeline_efficiency.py)", "",
         ("Warm actors (``scoring.scorer_lifetime: run``): every timed pass reuses the actors an untimed first pass per "
          "k started, so 'start-up' is that of a pass mid-run (no actor start)." if s.get("lifetime") == "run" else
          "Fresh actors in every pass (``scoring.scorer_lifetime: pass``)."), "",
         f"{m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB, torch {m['torch']}, ray {m['ray']}, "
         f"{m['date_utc']}, commit {str(m['git_commit'])[:8]}{' (ray_dal modified)' if m['ray_dal_dirty'] else ''}. "
         f"Load average at start {m['load_average_at_start']} (shared machine: co-tenant CPU per run is in the JSON).",
         f"Settings: {json.dumps(s)}", "",
         "efficiency = pipeline rate (score_pool: samples / wall s, actor start-up included) / (k x in-process "
         "dynamic_scores rate on pre-decoded tensors, 1 torch thread = the scorer actor's max(1, int(0.5 CPU)), "
         "same model, G, batch size). Medians over repeats; each run is compared with the in-process rate timed "
         "just before and after it. steady = samples / (wall - time when the last actor finished __init__), i.e. "
         "start-up excluded (tail imbalance kept). in-task = samples / (actors' time inside their submit tasks / k): "
         "the actors' own rate while they had input. "
         "decode bound = t_score / (t_score + t_decode): the ceiling of an actor that decodes and scores in one thread. "
         "k-proc = k concurrent 1-thread processes scoring pre-decoded tensors (what the machine gives right now).", "",
         "| model | pool | B | k | pipeline /s | steady /s | in-task /s | in-process /s | efficiency | steady eff. | decode bound | "
         "eff. vs decode+score | k-proc /s | eff. vs k-proc | first block s | actor util | n |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for st in result["studies"]:
        for k, r in st["summary"].items():
            if not k.isdigit():
                continue
            L.append(f"| {st['model']} | {st['pool_rows']} {st['pool_kind']} | {st['batch_size']} | {k} | {f(r['rate'])} | {f(r['steady_rate'])} | {f(r['in_task_rate'])} | "
                     f"{f(r['inprocess_score_rate'])} | {f(r['efficiency'], 3)} | {f(r['steady_efficiency'], 3)} | "
                     f"{f(st['decode_bound'], 3)} | {f(r['efficiency_vs_decode_plus_score'], 3)} | "
                     f"{f(r['parallel_inprocess_rate'])} | {f(r['efficiency_vs_parallel'], 3)} | {f(r['first_block_s'], 2)} | "
                     f"{f(r['scorer_actor_utilisation'], 2)} | {r['n']} |")
    L += ["", "Actors 2 vs 1 (pipeline rate ratio): " + ", ".join(
        f"{st['label']} {f(st['summary'].get('speedup_2_vs_1'), 2)} (steady {f(st['summary'].get('steady_speedup_2_vs_1'), 2)})"
        for st in result["studies"] if "speedup_2_vs_1" in st["summary"]), "",
          "CPU-seconds per run by process (median; session = this process and all its descendants, the embedded "
          "Ray cluster), machine capacity = cores x wall:", "",
          "| model | k | wall s | scorer actors | read tasks | driver | raylet | gcs | other | co-tenants | capacity |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for st in result["studies"]:
        for k, r in st["summary"].items():
            if not k.isdigit():
                continue
            c = r["cpu_s_by_process"]
            other = sum(v for n, v in c.items() if n not in ("scorer_actors", "read_tasks", "driver", "raylet", "gcs"))
            L.append(f"| {st['label']} | {k} | {f(r['seconds'], 1)} | {f(c.get('scorer_actors'), 1)} | {f(c.get('read_tasks'), 1)} | "
                     f"{f(c.get('driver'), 1)} | {f(c.get('raylet'), 1)} | {f(c.get('gcs'), 1)} | {f(other, 1)} | "
                     f"{f(r['co_tenant_cpu_s'], 1)} | {f(r['machine_capacity_cpu_s'], 1)} |")
    L += ["", "Start-up, from Ray's timeline (median seconds after the score_pool call): the actor's __init__ task "
          "starts (worker process spawned), __init__ (unpickling PoolScorer imports torch + ray_dal, then model and G), "
          "actors ready, first scored block at the driver; busy after init = time in the actors' submit tasks / "
          "(k x (wall - ready)):", "",
          "| model | k | init starts | __init__ s | ready | first block | wall | busy after init | read tasks CPU-s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for st in result["studies"]:
        for k, r in st["summary"].items():
            if k.isdigit():
                L.append(f"| {st['label']} | {k} | {f(r['actor_init_start_s'], 2)} | {f(r['actor_init_s'], 2)} | "
                         f"{f(r['actor_ready_s'], 2)} | {f(r['first_block_s'], 2)} | {f(r['seconds'], 2)} | "
                         f"{f(r['busy_after_init'], 2)} | {f(r['read_task_s_total'], 2)} |")
    prof = [st for st in result["studies"] if st.get("pyspy", {}).get("status") == "ok"]
    if prof:
        L += ["", "py-spy profile of one scorer actor's worker thread (share of samples, --idle, 100 Hz):", ""]
        for st in prof:
            p = st["pyspy"]
            L.append(f"- {st['label']} (k={p['run']['k']}): " + ", ".join(f"{n} {v:.1%}" for n, v in p["share"].items())
                     + f" ({p['samples']} samples)")
    d = result.get("decode_alternatives", {})
    if d.get("status") == "ok":
        L += ["", f"Decode + normalize per 32x32 JPEG, 1 thread, batch {d['batch_size']}: PIL "
              f"{d['pil_us_per_image']:.1f} us, preprocess_batch (libjpeg-turbo) {d['torchvision_us_per_image']:.1f} us "
              f"({d['speedup']:.1f}x); pixels differ in {d['fraction_pixels_differ']:.2%} of values (max |diff| "
              f"{d['max_abs_pixel_diff']})."]
    if result.get("findings"):
        L += ["", "## Findings", ""] + [f"- {x}" for x in result["findings"]]
    path.write_text("\n".join(L) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = result["studies"]
    fig, axes = plt.subplots(1, 1 + len(studies), figsize=(5 * (1 + len(studies)), 4))
    ax = axes[0]
    labels, eff, steady, bound = [], [], [], []
    for st in studies:
        for k, r in st["summary"].items():
            if k.isdigit():
                labels.append(f"{st['label'].replace(' ', chr(10))}\nk={k}")
                eff.append(r["efficiency"])
                steady.append(r["steady_efficiency"])
                bound.append(st["decode_bound"])
    xs = np.arange(len(labels))
    ax.bar(xs - 0.27, eff, 0.27, label="efficiency")
    ax.bar(xs, steady, 0.27, label="steady-state")
    ax.bar(xs + 0.27, bound, 0.27, label="decode bound")
    ax.axhline(0.8, color="k", ls="--", lw=1, label="target 0.8")
    ax.set_xticks(xs, labels)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("pipeline rate / (k x in-process rate)")
    ax.legend(fontsize=7)
    ax.set_title("efficiency")
    for ax, st in zip(axes[1:], studies):
        for k in sorted({r["k"] for r in st["runs"]}):
            run = next(r for r in st["runs"] if r["k"] == k)
            t = [p[0] for p in run["progress"]]
            n = [p[2] if len(p) > 2 else c for p, c in zip(run["progress"], np.cumsum([p[1] for p in run["progress"]]))]
            ax.plot(t, n, label=f"k={k} pipeline")
            ideal = k * run["inprocess_score_rate"]
            ax.plot([0, t[-1]], [0, ideal * t[-1]], ls=":", label=f"k={k} x in-process")
        ax.set_xlabel("seconds since score_pool call")
        ax.set_ylabel("samples scored (driver sees)")
        ax.set_title(f"{st['label']}: progress (first repeat; blocks subsampled)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def findings(result: dict) -> list[str]:
    out = ["Efficiency factorises (approximately) as start-up x decode x CPU share: start-up = pipeline rate / steady "
           "rate; decode = the decode bound; CPU share = actors' in-task rate / (k x in-process decode+score rate), "
           "which is below 1 when the actors get less than a whole core each (co-tenants, Ray's own processes)."]
    for st in result["studies"]:
        sm = st["summary"]
        for k, r in sm.items():
            if not k.isdigit():
                continue
            su, dec = r["rate"] / r["steady_rate"], st["decode_bound"]
            share = r["in_task_rate"] / (int(k) * r["inprocess_decode_plus_score_rate"])
            out.append(f"{st['label']} k={k}: start-up {su:.2f} x decode {dec:.2f} x CPU share {share:.2f} = "
                       f"{su * dec * share:.3f} (measured {r['efficiency']:.3f}).")
            ok = r["efficiency"] >= 0.8
            out.append(f"{st['label']} ({st['pool_kind']}) k={k}: efficiency {r['efficiency']:.3f} ({'meets' if ok else 'misses'} 0.8); steady "
                       f"{r['steady_efficiency']:.3f}; the decode bound (decode+score in one thread) is {st['decode_bound']:.3f}, "
                       f"and against the in-process decode+score rate the pipeline reaches {r['efficiency_vs_decode_plus_score']:.3f}; "
                       f"first block after {r['first_block_s']:.2f}s; scorer actors busy {r['scorer_actor_utilisation']:.0%} of wall.")
    return out


def main(argv=None) -> None:
    global CIFAR
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run (~20 s): cnn on 1536 CIFAR-10 images (6 batches), 1 repeat, smaller baselines")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--models", nargs="+", default=None, help="studies to run: cnn, resnet18, cnn@synthetic100k")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="folder for NAME.json/.md/.png (default benchmarks/results)")
    p.add_argument("--data-dir", type=Path, default=CIFAR,
                   help="CIFAR-10 folder with train.parquet and test.parquet (default ../shared/data/cifar10)")
    p.add_argument("--lifetime", choices=("pass", "run"), default="pass",
                   help="scoring.scorer_lifetime of the timed passes: pass (fresh actors, start-up in every pass) or "
                        "run (warm actors started by an untimed pass per k)")
    p.add_argument("--name", default=None,
                   help="output file stem (default pipeline_efficiency[_warm][_quick], _warm for --lifetime run)")
    p.add_argument("--replot", type=Path, default=None, help="rewrite the .md/.png of an existing result JSON and exit")
    a = p.parse_args(argv)
    CIFAR = a.data_dir.resolve()
    if a.replot:
        result = json.loads(a.replot.read_text())
        result["findings"] = findings(result)
        a.replot.write_text(json.dumps(result, indent=1, default=float))
        write_markdown(result, a.replot.with_suffix(".md"))
        plot(result, a.replot.with_suffix(".png"))
        return
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*minimum number of concurrent actors.*")
    warnings.filterwarnings("ignore", message=".*buffer is not writable.*")
    TMP.mkdir(parents=True, exist_ok=True)

    if a.quick:
        plans = {"cnn": dict(pool=cifar_subset(1536, 256), batch_size=256, repeats=a.repeats or 1, base_batches=1,
                             base_repeats=2, parallel_batches=2, parallel_start_s=3.0, budget=500, profile_s=0)}
    else:
        plans = {"cnn": dict(pool=CIFAR / "train.parquet", batch_size=256, repeats=a.repeats or 3, base_batches=3,
                             base_repeats=2, parallel_batches=12, budget=500, profile_s=12),
                 "resnet18": dict(pool=cifar_subset(768, 64), batch_size=64, repeats=a.repeats or 2, base_batches=1,
                                  base_repeats=2, parallel_batches=2, budget=500, profile_s=0),
                 "cnn@synthetic100k": dict(pool=synthetic_pool(100_000), batch_size=256, repeats=a.repeats or 1,
                                           base_batches=3, base_repeats=2, parallel_batches=0, budget=500, profile_s=0)}
    models = a.models or list(plans)
    settings = {"quick": a.quick, "lifetime": a.lifetime, "strategy": "dynamic", "scope": "all", "gamma": GAMMA, "cpus_per_scorer": CPUS_PER_SCORER,
                "threads_per_actor": THREADS_PER_ACTOR, "ks": [1, 2], "ray_num_cpus": psutil.cpu_count(),
                "plans": {m: {k: str(v) if isinstance(v, Path) else v for k, v in plans[m].items()} for m in models}}
    machine = record.machine_info()
    init_ray(num_cpus=psutil.cpu_count(), no_progress_timeout_s=300)
    ray.data.DataContext.get_current().enable_progress_bars = False
    result = {"machine": machine, "settings": settings, "studies": []}
    for key in models:
        plan = dict(plans[key])
        st = study(key.split("@")[0], ks=[1, 2], lifetime=a.lifetime, **plan)
        st["pool_kind"] = key.split("@")[1] if "@" in key else ("CIFAR-10" if "cifar" in str(plan["pool"]) else "")
        st["label"] = f"{st['model']} {st['pool_rows'] // 1000}k" if st["pool_rows"] >= 1000 else f"{st['model']} {st['pool_rows']}"
        result["studies"].append(st)
    result["decode_alternatives"] = decode_alternatives(plans[models[0]]["pool"], 256, 5)
    result["findings"] = findings(result)
    stem = a.name or ("pipeline_efficiency" + ("_warm" if a.lifetime == "run" else "") + ("_quick" if a.quick else ""))
    record.save(result, a.out, stem, write_markdown, plot)
    print("\n".join(result["findings"]))
    print(f"wrote {a.out / stem}.json/.md/.png")
    ray.shutdown()


if __name__ == "__main__":
    main()
