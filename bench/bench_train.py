#!/usr/bin/env python3
"""Training-step speed, canon against torchvision's same architecture (`canon bench train`).

    python bench/bench_train.py --model resnet50_v1_5 [--amp bf16] [--compile | --cuda-graph]
        [--json PATH]
"""

from canon.bench.commands import add_train_arguments, run_script, run_train

if __name__ == "__main__":
    run_script(__doc__, add_train_arguments, run_train)
