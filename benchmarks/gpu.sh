#!/usr/bin/env bash
# The GPU benchmarks in one command, meant for one GPU (not yet timed on one):
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # default OUT_DIR: gpu_benchmarks
#
# 1. The AutoLoRa train step (PGD-10 with a random start, natural and adversarial passes, one update) of
#    ResNet-50 and ViT-B/16 at 224x224, batch 128, in float32 and in bfloat16: ours against the PyTorch
#    reference step (benchmarks/torch_reference.py) in one process, images per second, peak device memory
#    and the model FLOP utilisation (MFU: the model FLOPs of the step per second over the GPU's dense peak).
#    float32 compares TF32 with TF32: JAX's default precision uses it on GPUs, and the reference runs with
#    torch.set_float32_matmul_precision('high'); bfloat16 is ours in bfloat16 against torch.autocast.
# 2. AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square) on 1,000 CIFAR-size points (32x32) with a
#    CIFAR ResNet-18 of random weights, labelled by its own predictions, at a Linf budget of 0.002, where most
#    points survive every attack (the most work the cascade can do; at 8/255 such a model loses its points
#    in the first attack): the first call (compiling) and a warm one.
#
# Peaks (TFLOP/s, dense): PEAK_BF16 and PEAK_TF32, by default an H100 SXM's (989 and 495); set them for
# another GPU (A100: 312 and 156). The tables go to OUT_DIR/gpu.txt, each case's numbers to OUT_DIR/*.json.
# TINY=1 runs the same commands at tiny shapes (32x32, batch 2, narrow ResNets), to try the script on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_benchmarks}
mkdir -p "$OUT"
PEAK_BF16=${PEAK_BF16:-989}
PEAK_TF32=${PEAK_TF32:-495}
if [[ "${TINY:-0}" == 1 ]]; then
  SHAPE=(--resolution=32 --batch=2 --reps=1 --width=8 --pgd_steps=2)
  AA=(--arch=resnet18 --stem=cifar --resolution=32 --batch=4 --aa_images=4 --reps=1 --width=8)
else
  SHAPE=(--resolution=224 --batch=128 --reps=5)
  AA=(--arch=resnet18 --stem=cifar --resolution=32 --batch=1000 --aa_images=1000 --reps=1)
fi
python=${PYTHON:-python}
{
  echo "== train step, float32 (TF32) =="
  "$python" -m benchmarks.step --arch=resnet50,vit_b16 --parts=train "${SHAPE[@]}" --dtype=float32 \
    --torch_matmul_precision=high --peak_flops="${PEAK_TF32}e12" --json="$OUT/train_float32.json"
  echo
  echo "== train step, bfloat16 =="
  "$python" -m benchmarks.step --arch=resnet50,vit_b16 --parts=train "${SHAPE[@]}" --dtype=bfloat16 \
    --torch_autocast=bfloat16 --peak_flops="${PEAK_BF16}e12" --json="$OUT/train_bfloat16.json"
  echo
  echo "== AutoAttack, standard version =="
  "$python" -m benchmarks.step --parts=autoattack "${AA[@]}" --aa_version=standard --aa_eps=0.002 \
    --json="$OUT/autoattack.json"
} 2>&1 | tee "$OUT/gpu.txt"
