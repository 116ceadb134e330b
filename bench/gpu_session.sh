#!/usr/bin/env bash
# Issue 14's GPU figures in one call of a lent device (/work/.library/device/README.md). Nothing
# installs there: it runs the checkout with PYTHONPATH=src on the machine's own torch. The
# 1,500-image Imagenette slice travels in .devdata (ignored by git; name it in the call's carry):
#   mkdir -p .devdata && cp -r ../shared/data/imagenette2-160-mini .devdata/
# Most important first, since a call is cut at its limit: the GPU tests (captured step against
# eager, nvJPEG crops against the CPU pipeline and beside a queued step, Polyak averaging, model
# parallelism), the JPEG pipeline on the GPU alone (`bench data --device cuda`: nvJPEG and
# the crops, against one CPU core), ResNet-50's step eager, in a CUDA graph and compiled
# against torchvision's (bf16), ResNet-110 at the paper's batch 128 with and without the graph
# (its 64k-iteration schedule takes 64,000 x 128 / images/s), the other models' eager steps,
# and ResNet-50 training on real JPEGs decoded on the GPU and by loader processes (images/s per
# epoch in metrics.csv). Each command has a time limit. The device tool brings back at most 8 files
# from $OUT: the JSON figures and the real-JPEG runs' metrics go into one results.tar, re-packed
# after every command so a cut call still returns them; the printed tables go to log.txt. Give
# the call timeout_s 600 (on 2026-12-04 an H200 ran it in 380 s, without the data bench).
set -u -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 CANON_SHARED_DATA=$PWD/.devdata
out=${OUT:-gpu-results}
figures=$(mktemp -d) runs=$(mktemp -d)  # the run's checkpoints stay behind
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

step 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_training.py \
  tests/test_fidelity_training.py tests/test_data_device_jpeg.py tests/test_model_parallel.py
step 60 python3 -m canon bench data --data .devdata/imagenette2-160-mini --images 1000 \
  --repeats 3 --recipe resnet50-goyal --device cuda --json "$figures/data-on-device.json"
train_bench resnet50_v1_5 45 --model resnet50_v1_5
train_bench resnet50_v1_5-graph 45 --model resnet50_v1_5 --cuda-graph
for graph in true false; do
  step 60 python3 -m canon bench loop --device cuda --repeats 2 --workers 4 \
    --set model.name=resnet110 --set train.batch_size=128 --set optimizer.base_batch_size=128 \
    --set train.cuda_graph=$graph --json "$figures/loop-resnet110-graph-$graph.json"
done
for model in resnet18 alexnet_owt googlenet_bn; do
  train_bench "$model" 40 --model "$model"
done
train_bench vgg16 40 --model vgg16 --batch-size 128
for decode in true false; do  # ResNet-50 on real JPEGs: nvJPEG, or 14 loader processes
  step 70 python3 -m canon train --recipe resnet18-imagenette5 \
    --data .devdata/imagenette2-160-mini --set model.name=resnet50_v1_5 --set optimizer.lr=0.1 \
    --set data.crop_size=224 --set data.resize_size=256 --set train.batch_size=256 \
    --set train.epochs=12 --set train.amp=bf16 --set train.decode_on_device=$decode \
    --set train.workers=14 --device cuda --output-dir "$runs/jpeg-$decode"
  cp "$runs/jpeg-$decode/metrics.csv" "$figures/jpeg-resnet50-decode-on-device-$decode.csv"
done
train_bench resnet50_v1_5-compiled 170 --model resnet50_v1_5 --compile
