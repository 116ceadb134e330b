#!/usr/bin/env python3
"""Input-pipeline speed per core, canon's JPEG training pipeline against torchvision's doing
the same geometry (`canon bench data`).

    python bench/bench_data.py --data /path/to/imagenet [--recipe NAME|all] [--json PATH]
"""

from canon.bench.commands import add_data_arguments, run_data, run_script

if __name__ == "__main__":
    run_script(__doc__, add_data_arguments, run_data)
