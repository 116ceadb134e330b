#!/usr/bin/env bash
# Issue 13's and 14's GPU work for a lent device (/work/.library/device/README.md), in parts:
#   bash bench/gpu_session.sh PART...      (no PART: tests data steps loop jpeg compiled)
# Nothing installs there: it runs the checkout with PYTHONPATH=src on the machine's own torch.
# Data travels in .devdata (ignored by git; name it in the call's carry), filled here by
# `bash bench/gpu_stage.sh N` for call N of three; 64 MiB travel per call, so CIFAR-10 (98 MB)
# comes in pieces that the part `stash` keeps in .devcache, which lasts while the machine stays
# warm (30 s between calls):
#   call 1: stage 1 (Imagenette slice, CIFAR batches 1-2)  `... stash tests jpeg data`
#   call 2: stage 2 (CIFAR batches 3-4)                      `... stash loop steps`
#   call 3: stage 3 (CIFAR batch 5, test batch, checksums)  `... stash cifar`
# Give each call timeout_s 600. On 2026-12-04 an H200 ran tests+data+steps+loop+jpeg+compiled
# (the part list of that day) in 380 s.
# Parts:
#   tests     the GPU tests: captured steps (eager and compiled) against uncaptured ones,
#             nvJPEG crops against the CPU pipeline and beside a queued step, Polyak
#             averaging, model parallelism
#   data      canon's on-device JPEG path alone (`bench data --device cuda`) against a CPU core
#   jpeg      ResNet-50 training on real JPEGs decoded by nvJPEG and by 14 loader processes
#             (images/s per epoch in metrics.csv; nvJPEG's went NaN before 7e1575e)
#   steps     ResNet-50's step eager, graphed, and compiled and graphed against torchvision's
#             (bf16), and the other models' eager steps
#   compiled  ResNet-50 compiled alone (the slowest: compiling both models takes minutes)
#   loop      ResNet-110 at the paper's batch 128: fp32 graphed, bf16 graphed, bf16 graphed
#             and compiled, channels_last (its 64k-iteration schedule takes 64,000 x 128 /
#             images/s; the goal is <= 8 min)
#   stash     move the CIFAR pieces this call carried into .devcache/cifar-src
#   cifar     unpack CIFAR-10 there; ResNet-20 against the clock (wall time to the final
#             test error at 30 epochs of batch 512, bf16, graphed; the goal: 91.25% in
#             <= 30 s); then the five depths of Table 6 at once (`reproduce cifar-table6
#             --jobs 5 --cuda-graph`) for two minutes, whose per-epoch seconds time the table
# The device tool brings back at most 8 files from $OUT: the JSON figures and the runs'
# metrics go into one results.tar, re-packed after every command so a cut call still returns
# them; the printed tables go to log.txt. Each command has a time limit.
set -u -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 CANON_SHARED_DATA=$PWD/.devdata
out=${OUT:-gpu-results}
figures=$(mktemp -d) runs=$(mktemp -d)  # the runs' checkpoints stay behind
cifar=.devcache/cifar  # holds cifar-10-batches-py once unpacked
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv > "$out/gpu.txt"
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)" >> "$out/gpu.txt"
git log -1 --format=%h >> "$out/gpu.txt" 2>/dev/null

step() {  # step SECONDS COMMAND...: run it within SECONDS, log it, re-pack the figures
  echo "== $(date +%T) ${*:2}" >> "$out/log.txt"
  timeout "$1" "${@:2}" 2>&1 | tr '\r' '\n' | grep -v -e "step/s" -e "^ *$" | tee -a "$out/log.txt"
  tar -cf "$out/results.tar" -C "$figures" .
}
train_bench() {  # train_bench NAME SECONDS FLAGS...: canon bench train, figures to NAME.json
  step "$2" python3 -m canon bench train --amp bf16 --repeats 3 --steps 30 \
    --json "$figures/train-$1.json" "${@:3}"
}
loop_bench() {  # loop_bench NAME SETTINGS...: ResNet-110's loop at batch 128
  step 90 python3 -m canon bench loop --device cuda --repeats 2 --workers 4 \
    --set model.name=resnet110 --set train.batch_size=128 --set optimizer.base_batch_size=128 \
    "${@:2}" --json "$figures/loop-resnet110-$1.json"
}
timed_train() {  # timed_train NAME SECONDS ARGS...: canon train, wall time and metrics kept
  local start=$SECONDS
  step "$2" python3 -m canon train "${@:3}" --device cuda --output-dir "$runs/$1"
  echo "$1: $((SECONDS - start)) s wall, start to exit" | tee -a "$out/log.txt"
  cp "$runs/$1/metrics.csv" "$figures/$1.csv" 2>/dev/null
}

part_tests() {
  step 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_training.py \
    tests/test_fidelity_training.py tests/test_data_device_jpeg.py tests/test_model_parallel.py
}
part_data() {
  step 60 python3 -m canon bench data --data .devdata/imagenette2-160-mini --images 1000 \
    --repeats 3 --recipe resnet50-goyal --device cuda --json "$figures/data-on-device.json"
}
part_jpeg() {
  for decode in true false; do
    timed_train "jpeg-resnet50-decode-on-device-$decode" 70 --recipe resnet18-imagenette5 \
      --data .devdata/imagenette2-160-mini --set model.name=resnet50_v1_5 \
      --set optimizer.lr=0.1 --set data.crop_size=224 --set data.resize_size=256 \
      --set train.batch_size=256 --set train.epochs=12 --set train.amp=bf16 \
      --set train.decode_on_device=$decode --set train.workers=14
  done
}
part_steps() {
  train_bench resnet50_v1_5 45 --model resnet50_v1_5
  train_bench resnet50_v1_5-graph 45 --model resnet50_v1_5 --cuda-graph
  train_bench resnet50_v1_5-compiled-graph 170 --model resnet50_v1_5 --compile --cuda-graph
  for model in resnet18 alexnet_owt googlenet_bn; do
    train_bench "$model" 40 --model "$model"
  done
  train_bench vgg16 40 --model vgg16 --batch-size 128
}
part_compiled() {
  train_bench resnet50_v1_5-compiled 170 --model resnet50_v1_5 --compile
}
part_loop() {
  loop_bench fp32-graph --set train.cuda_graph=true
  loop_bench bf16-graph-cl --set train.cuda_graph=true --set train.amp=bf16 \
    --set train.channels_last=true
  loop_bench bf16-graph-compiled-cl --set train.cuda_graph=true --set train.amp=bf16 \
    --set train.channels_last=true --set train.compile=true
}
part_stash() {
  mkdir -p .devcache/cifar-src/cifar10
  cp -v .devdata/cifar10/* .devcache/cifar-src/cifar10/ 2>/dev/null | wc -l | sed 's/$/ files stashed/'
  cp .devdata/unpack_cifar10.py .devcache/cifar-src/ 2>/dev/null
  ls .devcache/cifar-src/cifar10 | tr '\n' ' ' >> "$out/log.txt"
}
part_cifar() {
  [ -f "$cifar/cifar-10-batches-py/batches.meta" ] ||
    step 60 python3 .devcache/cifar-src/unpack_cifar10.py "$cifar" || return
  local fast=(--recipe resnet20-cifar10-cosine --data "$cifar" --set train.iterations=null
              --set train.epochs=30 --set train.batch_size=512 --set train.amp=bf16
              --set train.cuda_graph=true --set train.channels_last=true)
  timed_train resnet20-30ep-paper 120 "${fast[@]}"
  timed_train resnet20-30ep-wd5e-4-ls 120 "${fast[@]}" --set optimizer.weight_decay=0.0005 \
    --set optimizer.nesterov=true --set train.label_smoothing=0.1
  step 150 python3 -m canon reproduce cifar-table6 --jobs 5 --cuda-graph --device cuda \
    --data "$cifar" --output-dir .devcache/reproduce
  for run in .devcache/reproduce/runs/*/; do
    cp "$run/metrics.csv" "$figures/table6-$(basename "$run").csv" 2>/dev/null
  done
  tar -cf "$out/results.tar" -C "$figures" .
}

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests data steps loop jpeg compiled)
for part in "${parts[@]}"; do
  if ! declare -F "part_$part" > /dev/null; then
    echo "no part $part: tests data jpeg steps compiled loop stash cifar" >&2
    exit 2
  fi
done
for part in "${parts[@]}"; do
  "part_$part"
done
