#!/usr/bin/env bash
# Every GPU measurement of the project in one go, each step's output in its own file (default benchmarks/results/cuda/):
# the LLaVA-1.5 prefill (Vicuna-7B shape, fp16; one image, then 8 prompts a call), the LLaVA-OneVision prefill on a
# 32- and a 64-frame video (Qwen2-7B shape), the encoder speed table (CLIP ViT-B, ViT-L, SigLIP so400m and a 32-frame
# video batch, with the ToMe control) at batch 1 and 32, where a forward's time goes (operator calls, kernel time
# against wall time, host synchronisations: benchmarks/merge_profile.py), a short offline `tuner run` of the LLaVA demo
# on the GPU (CUDA events, fp16) and the temporal-merge benchmark on 32 frames (WITH_TUNER=0 / WITH_TEMPORAL=0 leave
# those two out). Each step has its own time limit, so one that hangs does not take the others with it. Needs a CUDA
# GPU and the project's dependencies; about 5 minutes on an NVIDIA H200.
#
#     benchmarks/run_cuda.sh [OUT_DIR]
set -u
out=${1:-benchmarks/results/cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python}
failed=0

step() {  # step NAME LIMIT_S COMMAND...: run it, write NAME.txt, show its end
    local name=$1 limit=$2 started rc
    shift 2
    echo "== $name: $*"
    started=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - started)) s (limit $limit s)" | tee -a "$out/$name.txt"
    tail -n 30 "$out/$name.txt"
    [ "$rc" = 0 ] || failed=1
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$python" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
    "$python" -c "import datasets, optuna, plotly, sqlalchemy; print('optuna', optuna.__version__, 'datasets', datasets.__version__, 'plotly', plotly.__version__, 'sqlalchemy', sqlalchemy.__version__)"
} >"$out/environment.txt" 2>&1
cat "$out/environment.txt"

step mllm_prefill 150 "$python" benchmarks/mllm_prefill.py --device cuda --repeats 20
step mllm_prefill_batch8 150 "$python" benchmarks/mllm_prefill.py --device cuda --batch 8
step mllm_prefill_video32 150 "$python" benchmarks/mllm_prefill.py --device cuda --video 32
step mllm_prefill_video64 150 "$python" benchmarks/mllm_prefill.py --device cuda --video 64
step encoder_speed 180 "$python" benchmarks/encoder_speed.py --device cuda --full --control --frames 32
step encoder_speed_batch32 180 "$python" benchmarks/encoder_speed.py --device cuda --full --control --batch 32
step merge_profile 120 bash -c "$python benchmarks/merge_profile.py --device cuda --encoder ViT-B --batch 1 &&
    $python benchmarks/merge_profile.py --device cuda --encoder so400m --batch 32"
if [ "${WITH_TUNER:-1}" = 1 ]; then
    step tuner_run_digits_vqa 200 "$python" -m tuner run --task digits-vqa --budget 80% --trials 24 --timeout 120 \
        --device cuda --storage "sqlite:///$out/cuda_studies.db"
fi
if [ "${WITH_TEMPORAL:-1}" = 1 ]; then
    step temporal_merge 120 "$python" benchmarks/temporal_merge.py --full --device cuda --frames 32
fi
exit $failed
