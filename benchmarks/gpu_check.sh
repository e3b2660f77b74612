#!/usr/bin/env bash
# The first run of ray_dal on a CUDA GPU, in one go: under 8 minutes on one H200-class GPU (16 cores), after
# `make install` (the only thing it installs; a first install's download time comes on top).
#
#   bash benchmarks/gpu_check.sh          # then commit benchmarks/results/gpu/
#
# Parts, each under its own timeout; a failing part is recorded and the next one still runs:
#   exactness_float64/_float32/_bf16   tests/test_scoring_exact.py with the fast engine on CUDA in float64,
#       float32 (TF32 off) and under bfloat16 autocast, against the float64 CPU reference (the tests'
#       RAY_DAL_TEST_DEVICE / RAY_DAL_TEST_DTYPE / RAY_DAL_TEST_AUTOCAST; the three run side by side)
#   scoring_cost_cpu    benchmarks/scoring_cost.py, resnet18 at B = 256: it has no device flag, so this is the
#       host CPU's figure (all cores)
#   scoring_cost_cuda   the same methods (scoring_cost.make_methods) timed on the GPU, synchronised, medians of
#       10, for resnet18 and cnn at B = 256; scores' error against float64 on the GPU in float32 / TF32 / bf16
#   pool_1m   `ray-dal select`, resnet18, scope all, one GPU scorer (scoring.gpus_per_scorer's default: 1 when
#       the cluster has a GPU), over a 1M-sample synthetic JPEG pool (`ray-dal synth`); throughput, GPU use
# Writes OUT/: summary.md and summary.json (one line per part: ok/failed and its figure), environment.txt
# (date, commit, versions), nvidia-smi.txt, each part's log and results. Exit 0: every part ok; 1: some part
# failed; 2: no CUDA GPU visible to torch (nothing run, nothing written); 3: bad OUT.
#
# Environment: RAY_DAL_GPU_CHECK_OUT   results folder (default benchmarks/results/gpu; replaced by each run)
#              RAY_DAL_GPU_CHECK_POOL_SIZE   pool_1m's pool size (default 1000000)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=.venv/bin/python
OUT=${RAY_DAL_GPU_CHECK_OUT:-benchmarks/results/gpu}
POOL_SIZE=${RAY_DAL_GPU_CHECK_POOL_SIZE:-1000000}
LIMIT_S=440  # every part's timeout is cut to what is left of this (plus at most 10 s to kill): < 8 minutes
DEVICE=cuda

plan() {
    cat <<EOF
On a machine where torch sees a CUDA GPU this script runs, in under 8 minutes:
  1. tests/test_scoring_exact.py on CUDA (RAY_DAL_TEST_DEVICE=cuda) in float64, float32 and bf16 autocast
  2. benchmarks/scoring_cost.py, resnet18 at B = 256 (host CPU), and the same methods timed on CUDA
  3. ray-dal select, resnet18, scope all, 1 GPU scorer, over a ${POOL_SIZE}-sample synthetic pool
and writes the results to ${OUT}/.
EOF
}

# --- 1. a CUDA GPU visible to torch, or stop now (nothing written) ----------------------------------------

GPU_PROBE='import sys, torch
build = f"torch {torch.__version__} (CUDA {torch.version.cuda})"
if torch.cuda.is_available() and torch.cuda.device_count() > 0:
    print(f"{torch.cuda.device_count()} CUDA GPU(s), {torch.cuda.get_device_name(0)}; {build}")
    sys.exit(0)
sys.exit(f"{build}: torch.cuda.is_available() is False")'

stop() {  # why: nothing runs, nothing is written
    {
        echo "gpu_check: FAILED: $1."
        echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}. Nothing was run and nothing was written."
        plan
    } >&2
    exit 2
}

probe_gpu() {  # torch's answer; sets GPU_FOUND
    local said rc=0
    said=$(timeout 60 "$PY" -c "$GPU_PROBE" 2>&1) || rc=$?
    if ((rc == 0)); then
        GPU_FOUND=$said
    elif ((rc == 124)); then
        stop "could not ask torch whether a CUDA GPU is visible: '$PY -c \"import torch ...\"' took over 60 s"
    else
        stop "no CUDA GPU is visible to torch ($(printf '%s' "$said" | tail -n 3 | tr '\n' ' ' | sed 's/ *$//'))"
    fi
}

# A CUDA GPU needs the driver's device files (/dev/nvidia0..., WSL: /dev/dxg): without them, or a GPU listed by
# nvidia-smi, torch cannot see one, and there is no need to wait for `import torch` (slow on a loaded machine).
if ! compgen -G '/dev/nvidia[0-9]*' >/dev/null && [[ ! -e /dev/dxg ]] &&
    ! { command -v nvidia-smi >/dev/null && timeout 10 nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }; then
    stop "no CUDA GPU is visible: no /dev/nvidia* device and no GPU listed by nvidia-smi (torch was not asked)"
fi
if [[ -x $PY ]]; then
    probe_gpu
fi
if [[ -e $OUT && -n $(ls -A "$OUT" 2>/dev/null) && ! -f $OUT/environment.txt ]]; then
    echo "gpu_check: $OUT holds files this script did not write; set RAY_DAL_GPU_CHECK_OUT to another folder" >&2
    exit 3
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ray_dal_gpu_check.XXXXXX")
BG_PIDS=()
# shellcheck disable=SC2329  # run by the EXIT trap
cleanup() {
    local pid
    for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# make install: a no-op when .venv is up to date; not counted in the 8 minutes
install_rc=0
make install >"$WORK/make_install.log" 2>&1 || install_rc=$?
if [[ ! -x $PY ]]; then
    echo "gpu_check: FAILED: make install exited $install_rc and left no $PY:" >&2
    tail -n 20 "$WORK/make_install.log" >&2
    exit 1
fi
[[ -n ${GPU_FOUND:-} ]] || probe_gpu

# --- the results folder: replaced by each run ----------------------------------------------------------------

rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
mv "$WORK/make_install.log" "$OUT/"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

START=$SECONDS
elapsed() { echo $((SECONDS - START)); }
# the timeout of a part: the seconds it wants, cut to what is left of LIMIT_S (at least 1: `timeout 0` never stops)
budget() {
    local left=$((LIMIT_S - (SECONDS - START)))
    left=$((left < 1 ? 1 : left))
    echo $(($1 < left ? $1 : left))
}
SUMMARY=()
note() {  # part status figure
    SUMMARY+=("$1"$'\t'"$2"$'\t'"$3")
    printf '[%3ss] %-18s %-6s %s\n' "$(elapsed)" "$1" "$2" "$3"
}
status_of() {  # exit code -> ok / failed
    if (($1 == 0)); then echo ok; else echo failed; fi
}
why() {  # exit code, timeout -> what went wrong, for the summary
    case $1 in
        0) echo "" ;;
        124 | 137) if (($2 <= 1)); then echo "not run: no time left of the 8 minutes; "; else
            echo "timed out after ${2}s; "; fi ;;
        *) echo "exit $1; " ;;
    esac
}

echo "gpu_check: $GPU_FOUND; results in $OUT"
if ((install_rc != 0)); then
    note make_install failed "exit $install_rc (the existing .venv is used); make_install.log"
fi

{
    echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "uncommitted changes (ray_dal, tests, benchmarks):"
    git status --porcelain -- ray_dal tests benchmarks 2>/dev/null | grep -v "^?? ${OUT#"$REPO"/}" |
        sed 's/^/  /' || true
    echo "gpu: $GPU_FOUND"
    echo "host: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -srm)"
    echo "python: $("$PY" -c 'import platform; print(platform.python_version())')"
    "$PY" -c 'import importlib.metadata as m
for d in ("torch", "torchvision", "ray", "numpy", "pyarrow"):
    print(f"{d}: {m.version(d)}")'
    "$PY" -c 'import torch; from torch.backends import cuda, cudnn
print(f"cudnn: {cudnn.version()}; TF32 conv {cudnn.allow_tf32}, matmul {cuda.matmul.allow_tf32}")'
} >"$OUT/environment.txt" 2>&1 || true
{
    timeout 20 nvidia-smi || true
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,power.limit \
        --format=csv || true
} >"$OUT/nvidia-smi.txt" 2>&1

# --- 2. exactness tests on CUDA, three precisions side by side; the synthetic pool is written meanwhile ----

POOL=$WORK/pool
timeout --kill-after=10 "$(budget 150)" .venv/bin/ray-dal synth --out "$POOL" --num-samples "$POOL_SIZE" \
    >"$OUT/pool_1m_synth.log" 2>&1 &
SYNTH_PID=$!
BG_PIDS+=("$SYNTH_PID")

declare -A EXACT_PID EXACT_T
T=$(budget 150)
for precision in float64 float32 bf16; do
    env_args=(RAY_DAL_TEST_DEVICE="$DEVICE" OMP_NUM_THREADS=4)
    case $precision in
        float64) env_args+=(RAY_DAL_TEST_DTYPE=float64) ;;
        float32) env_args+=(RAY_DAL_TEST_DTYPE=float32) ;;
        bf16) env_args+=(RAY_DAL_TEST_AUTOCAST=bf16) ;;
    esac
    timeout --kill-after=10 "$T" env "${env_args[@]}" "$PY" -m pytest -q -p no:cacheprovider -rfEs \
        --junitxml="$OUT/exactness_$precision.xml" tests/test_scoring_exact.py >"$OUT/exactness_$precision.log" 2>&1 &
    EXACT_PID[$precision]=$!
    EXACT_T[$precision]=$T
    BG_PIDS+=("$!")
done
for precision in float64 float32 bf16; do
    rc=0
    wait "${EXACT_PID[$precision]}" || rc=$?
    tally=$(grep -E '[0-9]+ (passed|failed|errors?|skipped)\b.* in [0-9.]+s' "$OUT/exactness_$precision.log" |
        tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//') || true
    note "exactness_$precision" "$(status_of $rc)" \
        "$(why $rc "${EXACT_T[$precision]}")${tally:-no pytest summary}; exactness_$precision.log"
done

# --- 3. scoring cost: scoring_cost.py as it is (host CPU), then the same methods on the GPU -----------------

T=$(budget 75)
rc=0
timeout --kill-after=10 "$T" "$PY" benchmarks/scoring_cost.py --models resnet18 --batch-sizes 256 \
    --methods train_step forward ray_dal_all ray_dal_last --repeats 3 --threads "$(nproc)" \
    --out "$OUT" --name scoring_cost_cpu >"$OUT/scoring_cost_cpu.log" 2>&1 || rc=$?
figure=$("$PY" - "$OUT/scoring_cost_cpu.json" <<'PY' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
c, t = r["cells"][0], r["settings"]["threads"]
step = c["methods"]["train_step"]["median_s"]
print(f"{c['model']} B={c['batch_size']} on the CPU ({t} threads): train_step {step:.3f}s, "
      f"all/train_step {c['ratios']['all/train_step']:.2f}, last/forward {c['ratios']['last/forward']:.2f}"
      + ("" if r.get("agreement", {}).get("ok") else "; agreement check FAILED"))
PY
) || figure="no result"
if [[ $figure == *FAILED* && $rc == 0 ]]; then rc=1; fi
note scoring_cost_cpu "$(status_of $rc)" "$(why $rc "$T")$figure"

T=$(budget 60)
rc=0
timeout --kill-after=10 "$T" "$PY" - "$OUT" "$DEVICE" >"$OUT/scoring_cost_cuda.log" 2>&1 <<'PY' || rc=$?
"""scoring_cost.py's train_step / forward / ray_dal_all / ray_dal_last on the GPU (B = 256): synchronised wall
time, round-robin, medians of 10 after 3 warm-up calls; peak GPU memory per call; the float32 (TF32 as torch's
defaults), IEEE float32 and bf16-autocast scores' max error against float64 on the same GPU."""
import copy, json, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
import record  # noqa: E402
import scoring_cost as sc  # noqa: E402

from ray_dal.models import build_model  # noqa: E402
from ray_dal.scoring import dynamic_scores, labeled_gradient  # noqa: E402

out, dev = Path(sys.argv[1]), torch.device(sys.argv[2])
B, REPEATS, METHODS = 256, 10, ["train_step", "forward", "ray_dal_all", "ray_dal_last"]
tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
result = {"machine": record.machine_info(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda,
                                         cudnn=torch.backends.cudnn.version(), tf32_conv_matmul=tf32),
          "batch_size": B, "repeats": REPEATS, "cells": []}


def timed(fn):
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, (torch.cuda.max_memory_allocated(dev) - base) / 2**20


for name in ("resnet18", "cnn"):
    torch.manual_seed(0)
    model = build_model(name, sc.NUM_CLASSES).to(dev).eval()
    gen = torch.Generator().manual_seed(1)
    lx, ly = torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, sc.NUM_CLASSES, (64,), generator=gen)
    G = labeled_gradient(model, (lx.to(dev), ly.to(dev)), scope="all")
    G_last = labeled_gradient(model, (lx.to(dev), ly.to(dev)), scope="last")
    x = torch.randn(B, 3, 32, 32, generator=gen).to(dev)
    y = torch.randint(0, sc.NUM_CLASSES, (B,), generator=gen).to(dev)
    fns = sc.make_methods(model, None, None, x, y, G, G_last)
    for m in METHODS:
        for _ in range(3):
            fns[m]()
    times, mem = {m: [] for m in METHODS}, {m: 0.0 for m in METHODS}
    for r in range(REPEATS):
        for m in METHODS[r % 4:] + METHODS[: r % 4]:
            s, mb = timed(fns[m])
            times[m].append(s)
            mem[m] = max(mem[m], mb)
    med = {m: statistics.median(t) for m, t in times.items()}
    m64 = copy.deepcopy(model).double()
    truth = dynamic_scores(m64, x.double(), {k: v.double() for k, v in G.items()}, sc.GAMMA)
    with torch.no_grad():
        label64 = m64(x.double()).argmax(1)
    errors, flips = {}, {}

    def measure(key):
        """The scores' error against float64; how many argmax pseudo-labels differ (a flip changes g_x)."""
        errors[key] = sc.max_rel_diff(dynamic_scores(model, x, G, sc.GAMMA), truth)
        with torch.no_grad():
            flips[key] = int((model(x).argmax(1) != label64).sum())

    measure("float32")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    measure("float32_ieee")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    with torch.autocast(dev.type, torch.bfloat16):
        measure("bf16_autocast")
    cell = {"model": name, "batch_size": B, "median_s": med, "times_s": times, "peak_mem_mib": mem,
            "all/train_step": med["ray_dal_all"] / med["train_step"],
            "last/forward": med["ray_dal_last"] / med["forward"],
            "all_samples_per_s": B / med["ray_dal_all"], "max_rel_diff_vs_float64": errors,
            "pseudo_label_flips_vs_float64": flips}
    result["cells"].append(cell)
    print(f"{name} B={B}: " + ", ".join(f"{m} {med[m] * 1e3:.2f} ms" for m in METHODS)
          + f"; all/train_step {cell['all/train_step']:.2f}, last/forward {cell['last/forward']:.2f}, "
          f"all {cell['all_samples_per_s']:.0f} samples/s; errors vs float64 (pseudo-label flips) "
          + ", ".join(f"{k} {v:.1e} ({flips[k]})" for k, v in errors.items()), flush=True)

(out / "scoring_cost_cuda.json").write_text(json.dumps(result, indent=1))
lines = ["# Scoring cost on the GPU (benchmarks/gpu_check.sh)", "",
         f"{result['machine']['gpu']}, torch {result['machine']['torch']} (CUDA {torch.version.cuda}), "
         f"{result['machine']['date_utc']}, commit {str(result['machine']['git_commit'])[:8]}. B = {B}, synchronised "
         f"wall time, medians of {REPEATS}; TF32 (conv, matmul) = {tf32}, torch's defaults.", "",
         "| model | train_step ms | forward ms | all ms | last ms | all/train_step | last/forward | all samples/s "
         "| err f32 | err f32 IEEE | err bf16 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
for c in result["cells"]:
    md, e, f = c["median_s"], c["max_rel_diff_vs_float64"], c["pseudo_label_flips_vs_float64"]
    lines.append(f"| {c['model']} | " + " | ".join(f"{md[m] * 1e3:.2f}" for m in METHODS)
                 + f" | {c['all/train_step']:.2f} | {c['last/forward']:.2f} | {c['all_samples_per_s']:.0f} | "
                 + " | ".join(f"{e[k]:.1e} ({f[k]})" for k in ("float32", "float32_ieee", "bf16_autocast")) + " |")
lines += ["", "err: max_i |s_i - t_i| / max_i |t_i| against the float64 scores t of the same model on the same GPU; "
          f"(n): samples of {B} whose argmax pseudo-label differs from float64's (their g_x is another class's). "
          "An untrained model's logits are near ties, so low precision flips labels there."]
(out / "scoring_cost_cuda.md").write_text("\n".join(lines) + "\n")
PY
figure=$("$PY" - "$OUT/scoring_cost_cuda.json" <<'PY' 2>/dev/null
import json, sys
c = json.load(open(sys.argv[1]))["cells"][0]
print(f"{c['model']} B=256 on the GPU: all/train_step {c['all/train_step']:.2f}, last/forward {c['last/forward']:.2f}, "
      f"all {c['all_samples_per_s']:.0f} samples/s, float32 error {c['max_rel_diff_vs_float64']['float32']:.1e}")
PY
) || figure="no result"
note scoring_cost_cuda "$(status_of $rc)" "$(why $rc "$T")$figure"

# --- 4. ray-dal select over the 1M-sample pool on one GPU scorer --------------------------------------------

rc=0
wait "$SYNTH_PID" || rc=$?
if ((rc != 0)); then
    note pool_1m failed "$(why $rc 150)writing the ${POOL_SIZE}-sample pool failed; see pool_1m_synth.log"
else
    rc=0
    "$PY" - "$WORK" "$POOL_SIZE" >"$OUT/pool_1m_inputs.log" 2>&1 <<'PY' || rc=$?
"""A seeded untrained resnet18 checkpoint and 500 labeled ids drawn from the pool, with the pool's labels."""
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ray_dal.models import build_model

work, n = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
torch.save(build_model("resnet18", 10).state_dict(), work / "resnet18_seed0.pt")
ids = np.sort(np.random.default_rng(0).choice(n, min(500, n // 2), replace=False)).astype(np.int64)
labels = np.concatenate([pq.read_table(f, columns=["label"])["label"].to_numpy()
                         for f in sorted((work / "pool").glob("*.parquet"))])[ids]
pq.write_table(pa.table({"id": ids, "label": labels.astype(np.int64)}), work / "labeled.parquet")
PY
    T=$(budget 400)
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 \
        >"$OUT/pool_1m_gpu_use.csv" 2>/dev/null &
    SMI_PID=$!
    BG_PIDS+=("$SMI_PID")
    t0=$SECONDS
    if ((rc == 0)); then
        timeout --kill-after=10 "$T" env -u RAY_ADDRESS .venv/bin/ray-dal select --pool "$POOL" \
            --checkpoint "$WORK/resnet18_seed0.pt" --labeled "$WORK/labeled.parquet" --budget 1000 \
            --out "$WORK/query.parquet" --model resnet18 --scope all --num-scorers 1 --batch-size 256 \
            --no-progress-timeout 120 >"$OUT/pool_1m_select.log" 2>&1 || rc=$?
    fi
    wall=$((SECONDS - t0))
    kill "$SMI_PID" 2>/dev/null || true
    cp "$WORK/query.log" "$OUT/pool_1m_ray.log" 2>/dev/null || true
    scored=$(grep -o 'scored [0-9]* samples in [0-9.]*s ([0-9]*/s)' "$OUT/pool_1m_select.log" | tail -n 1) ||
        scored=$(grep -o 'score: [0-9]*/[0-9]* img \[.*\]' "$OUT/pool_1m_select.log" | tail -n 1) || true
    gpu_use=$(awk -F', ' '{n++; s += $2; if ($2 > 0) busy++; if ($3 > m) m = $3} END { if (n) printf \
        "GPU utilisation %.0f%% on average (nvidia-smi, 1/s), %d of %d samples busy, peak %d MiB", s / n, busy, n, m }' \
        "$OUT/pool_1m_gpu_use.csv" 2>/dev/null) || true
    note pool_1m "$(status_of $rc)" "$(why $rc "$T")${scored:-no throughput line} (resnet18, scope all, 1 GPU scorer, \
${POOL_SIZE} samples); select wall ${wall}s; ${gpu_use:-no GPU samples}; pool_1m_select.log"
fi

# --- 5. summary ---------------------------------------------------------------------------------------------

printf '%s\n' "${SUMMARY[@]}" >"$OUT/summary.tsv"
"$PY" - "$OUT" "$(elapsed)" <<'PY' || true
import json, sys
from pathlib import Path

out, total = Path(sys.argv[1]), int(sys.argv[2])
parts = [dict(zip(("part", "status", "figure"), line.split("\t", 2)))
         for line in (out / "summary.tsv").read_text().splitlines() if line]
env = dict(line.split(": ", 1) for line in (out / "environment.txt").read_text().splitlines() if ": " in line)
summary = {"date_utc": env.get("date_utc"), "commit": env.get("commit"), "gpu": env.get("gpu"),
           "seconds": total, "ok": all(p["status"] == "ok" for p in parts), "parts": parts}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
lines = ["# First GPU check (benchmarks/gpu_check.sh)", "",
         f"{summary['gpu']}; {summary['date_utc']}, commit {summary['commit']}; {total} s. "
         "Details: environment.txt, nvidia-smi.txt and each part's log and results in this folder.", "",
         "| part | status | figure |", "|---|---|---|"]
lines += [f"| {p['part']} | {p['status']} | {p['figure']} |" for p in parts]
(out / "summary.md").write_text("\n".join(lines) + "\n")
PY
rm -f "$OUT/summary.tsv"

echo
echo "gpu_check summary ($(elapsed) s; $OUT):"
failed=0
for line in "${SUMMARY[@]}"; do
    IFS=$'\t' read -r part status figure <<<"$line"
    printf '  %-18s %-6s %s\n' "$part" "$status" "$figure"
    [[ $status == ok ]] || failed=1
done
exit "$failed"
