#!/usr/bin/env bash
# The GPU check in one run (docs/paper_sizes.md#the-gpu-check): the bf16 MoE layer against a
# dense MLP by GEMM path and the LIMoE-B/32 / dense B/32 training steps (limoe-bench
# suite=gpu), the CUDA branches of the test suite (--device cuda), and LIMoE against the
# dense tower trained on real data at a size a CPU cannot reach, with its routing summary.
#
#   scripts/gpu_check.sh [OUT_DIR]          on a GPU machine, from the checkout
#   DRY_RUN=1 scripts/gpu_check.sh OUT_DIR  the same steps on the CPU at tiny sizes
#   SECTIONS="profile train" ARMS=limoe scripts/gpu_check.sh   some steps only
#
# Runs from a checkout on PYTHONPATH (no install); wheels in .whl/ (open_clip, hydra-core,
# omegaconf, ...) are installed to /tmp/site first when present. Needs data/tabler
# (`limoe-data tabler`, docs/data.md). Writes bench.json, gpu_check.log, pytest.log,
# {limoe,dense}_metrics.json and limoe_routing.json into OUT_DIR and prints a summary.
set -uo pipefail
OUT_DIR=${1:-${OUT:-logs/gpu_check}}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
# A console script from the checkout: `limoe train key=value ...` runs limoe-train.
# Each step has a time limit (seconds: LIMIT=...), so one slow step cannot starve the rest.
limoe() {
  timeout "$LIMIT" $PY -c 'import sys; from limoe import cli; getattr(cli, sys.argv.pop(1))()' "$@"
}
section() { echo; echo "=== $1 ($(date +%T)) ==="; }
SECTIONS=${SECTIONS:-bench profile tests train}
ARMS=${ARMS:-limoe dense}
wants() { [[ " $SECTIONS " == *" $1 "* ]]; }

if [ "${DRY_RUN:-0}" = 1 ]; then
  DEVICE=cpu TRAINER="trainer=cpu"
  SHRUNK="'data=shapes','data.image_size=16','data.context_length=8','data.val_size=16','model.width=16','model.depth=2','model.num_heads=2','model.patch_size=8','model.embed_dim=16'"
  BENCH=("gpu.layer.tokens=[512]" "gpu.layer.dim=[64]" "gpu.layer.num_experts=[8]"
         gpu.layer.repeats=2 gpu.layer.warmup=1 gpu.train.batch_size=4 gpu.train.steps=2
         gpu.train.warmup=1 "gpu.train.models.limoe=['experiment=smoke']"
         "gpu.train.models.limoe_b32=[$SHRUNK,'model.moe_layers=[1]']"
         "gpu.train.models.dense_b32=[$SHRUNK]")
  SIZE=(size=smoke) STEPS=(trainer.max_steps=4 data.batch_size=16) PAIRS=32
else
  DEVICE=cuda TRAINER="trainer=gpu"
  # About 4 minutes on one H200: the layer grid of conf/bench.yaml with the grouped GEMM and
  # the loop, 60 timed steps of each model.
  BENCH=("gpu.layer.gemms=[grouped,loop]" gpu.layer.repeats=20 gpu.train.steps=60)
  # Between the default (width 96, 4 blocks) and B/32 (768, 12): width 512, 8 blocks of 8
  # heads on 64 px icons (64 patches of 8 px); LIMoE: 8 experts in every other block.
  SIZE=(size.width=512 size.embed_dim=256 size.depth=8 size.num_heads=8 size.num_experts=8)
  # 600 steps of 256 pairs (31 passes over the 4,955 training icons), stopped at 105 s if slower.
  STEPS=(trainer.max_steps=600 +trainer.max_time=00:00:01:45 data.batch_size=256
         data.num_workers=12) PAIRS=843
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
$PY -c "import torch, timm, lightning, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| timm', timm.__version__, '| lightning', lightning.__version__, '| open_clip', open_clip.__version__)"

if wants bench; then
section "1. limoe-bench suite=gpu device=$DEVICE"
LIMIT=180 limoe bench suite=gpu device=$DEVICE progress=false "out=$OUT_DIR/bench.json" \
  paths.log_dir=/tmp/limoe-bench "${BENCH[@]}"
echo "bench: exit $?"
fi

if wants profile; then
section "1b. where the MoE layer's time goes (torch.profiler)"
if [ "${DRY_RUN:-0}" = 1 ]; then PROFILE=(cpu 512 64); else PROFILE=(cuda); fi
timeout 60 $PY scripts/profile_moe_layer.py "${PROFILE[@]}" > "$OUT_DIR/profile.txt" 2>&1
echo "profile: exit $?"; grep "###" "$OUT_DIR/profile.txt"
fi

if wants tests; then
section "2. the CUDA branches of the test suite (--device $DEVICE)"
timeout 60 $PY -m pytest -q -p no:cacheprovider --device $DEVICE \
  "tests/test_moe_dispatch.py::test_grouped_and_padded_gemms_equal_the_loop" \
  "tests/test_lit.py::test_fused_adamw_steps_as_the_unfused_one" \
  "tests/test_data_files.py::test_csv_datamodule_trains_on_shuffled_full_batches" \
  > "$OUT_DIR/pytest.log" 2>&1
echo "pytest: exit $? ($(tail -n 1 "$OUT_DIR/pytest.log"))"
fi

if wants train; then
section "3. LIMoE and the dense tower on Tabler Icons at 64 px"
for arm in $ARMS; do
  layers=(); [ $arm = limoe ] && layers=("model.moe_layers=[1,3,5,7]")
  [ "${DRY_RUN:-0}" = 1 ] && [ $arm = limoe ] && layers=("model.moe_layers=[1,3]")
  LIMIT=190 limoe train model=$arm data=tabler data.image_size=64 $TRAINER "${SIZE[@]}" \
    "${STEPS[@]}" "${layers[@]}" callbacks.progress_bar.refresh_rate=0 \
    task_name=gpu_check "hydra.run.dir=/tmp/gpu_check/$arm" "paths.log_dir=/tmp/gpu_check"
  echo "train $arm: exit $?"
  cp /tmp/gpu_check/$arm/metrics.json "$OUT_DIR/${arm}_metrics.json"
done
LIMIT=40 limoe analyze ckpt=/tmp/gpu_check/limoe/checkpoints/last.ckpt out=/tmp/gpu_check/routing \
  device=$DEVICE num_pairs=$PAIRS num_examples=2
echo "analyze: exit $?"
cp /tmp/gpu_check/routing/summary.json "$OUT_DIR/limoe_routing.json"
fi

section "summary"
$PY - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
read = lambda name: json.loads((out / name).read_text()) if (out / name).is_file() else None
bench = read("bench.json") or {"gpu_layer": [], "gpu_train": [], "targets": []}
for row in bench["gpu_layer"]:
    vs = row["time_vs_dense"]
    print(f"layer {row['mode']:>14} E={row['num_experts']} cf={row['capacity_factor']} "
          f"{row['pass']}: {row['median_s'] * 1e3:.2f} ms" + (f", {vs:.2f}x dense's time" if vs else ""))
for row in bench["gpu_train"]:
    print(f"train {row['model']:>10}: {row['pairs_per_s']:.0f} pairs/s, peak {row['peak_memory_gib']} GiB, "
          f"finite {row['losses_finite']}, vs dense {row['pairs_per_s_vs_dense']}")
for t in bench["targets"]:
    print("target:", t)
for arm in ("limoe", "dense"):
    m = read(f"{arm}_metrics.json")
    if m is None:
        continue
    keys = ("test/image_to_text_R@1", "test/text_to_image_R@1", "test_novel/image_to_text_R@1",
            "model/flops_per_pair", "model/params_total", "train/samples_per_second", "train/wall_seconds")
    print(arm, {k: round(m[k], 4) for k in keys if k in m})
print("routing:", json.dumps(read("limoe_routing.json"))[:1500])
PY
