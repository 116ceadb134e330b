#!/usr/bin/env bash
# Issue 14's GPU figures in one call of a lent device (/work/.library/device/README.md): the
# training step of canon's models against torchvision's (bf16, eager, then ResNet-50 compiled
# and with canon's step in a CUDA graph), canon's CIFAR loop against the plain one, and
# ResNet-110 at the paper's batch 128 with the step captured in a CUDA graph and without (its
# 64k-iteration schedule takes 64,000 x 128 / images/s). Nothing installs there: it runs the
# checkout with PYTHONPATH=src on the machine's own torch. About 9 minutes on one H100; figures
# go to $OUT (the device tool brings them back) or ./gpu-results.
set -u -o pipefail
export PYTHONPATH=src
out=${OUT:-gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv > "$out/gpu.txt"
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)" >> "$out/gpu.txt"
for model in resnet50_v1_5 resnet18 alexnet_owt googlenet_bn; do
  python3 -m canon bench train --model "$model" --amp bf16 --repeats 3 \
    --json "$out/train-$model.json" 2>&1 | tee -a "$out/log.txt"
done
python3 -m canon bench train --model vgg16 --amp bf16 --batch-size 128 --repeats 3 \
  --json "$out/train-vgg16.json" 2>&1 | tee -a "$out/log.txt"
python3 -m canon bench train --model resnet50_v1_5 --amp bf16 --compile --repeats 3 \
  --json "$out/train-resnet50_v1_5-compiled.json" 2>&1 | tee -a "$out/log.txt"
python3 -m canon bench train --model resnet50_v1_5 --amp bf16 --cuda-graph --repeats 3 \
  --json "$out/train-resnet50_v1_5-graph.json" 2>&1 | tee -a "$out/log.txt"
python3 -m canon bench loop --device cuda --repeats 3 --json "$out/loop.json" 2>&1 \
  | tee -a "$out/log.txt"
for graph in false true; do
  python3 -m canon bench loop --device cuda --repeats 3 --workers 4 \
    --set model.name=resnet110 --set train.batch_size=128 --set optimizer.base_batch_size=128 \
    --set train.cuda_graph=$graph --json "$out/loop-resnet110-graph-$graph.json" 2>&1 \
    | tee -a "$out/log.txt"
done
