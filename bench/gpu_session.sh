#!/usr/bin/env bash
# Issue 14's GPU figures in one call of a lent device (/work/.library/device/README.md). Nothing
# installs there: it runs the checkout with PYTHONPATH=src on the machine's own torch.
# Most important first, since a call is cut at its limit: the captured step checked against the
# eager one (the `gpu` test), ResNet-110 at the paper's batch 128 with and without the CUDA graph
# (its 64k-iteration schedule takes 64,000 x 128 / images/s), ResNet-50 with canon's step in a
# graph, the eager training steps of canon's models against torchvision's (bf16), canon's CIFAR
# loop against the plain one, and ResNet-50 compiled last (the slowest to start). Each command
# has a time limit. The device tool brings back at most 8 files from $OUT: the JSON figures go
# into one results.tar, re-packed after every command so a cut call still returns them; the
# printed tables go to log.txt. Give the call timeout_s 600.
set -u -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-gpu-results}
figures=$(mktemp -d)
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv > "$out/gpu.txt"
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)" >> "$out/gpu.txt"

step() {  # step SECONDS COMMAND...: run it within SECONDS, log it, re-pack the figures
  echo "== ${*:2}" >> "$out/log.txt"
  timeout "$1" "${@:2}" 2>&1 | tee -a "$out/log.txt"
  tar -cf "$out/results.tar" -C "$figures" .
}

step 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_training.py
for graph in true false; do
  step 90 python3 -m canon bench loop --device cuda --repeats 2 --workers 4 \
    --set model.name=resnet110 --set train.batch_size=128 --set optimizer.base_batch_size=128 \
    --set train.cuda_graph=$graph --json "$figures/loop-resnet110-graph-$graph.json"
done
step 60 python3 -m canon bench train --model resnet50_v1_5 --amp bf16 --cuda-graph --repeats 3 \
  --json "$figures/train-resnet50_v1_5-graph.json"
for model in resnet50_v1_5 resnet18 alexnet_owt googlenet_bn; do
  step 45 python3 -m canon bench train --model "$model" --amp bf16 --repeats 3 \
    --json "$figures/train-$model.json"
done
step 45 python3 -m canon bench train --model vgg16 --amp bf16 --batch-size 128 --repeats 3 \
  --json "$figures/train-vgg16.json"
step 45 python3 -m canon bench loop --device cuda --repeats 3 --json "$figures/loop.json"
step 150 python3 -m canon bench train --model resnet50_v1_5 --amp bf16 --compile --repeats 3 \
  --json "$figures/train-resnet50_v1_5-compiled.json"
