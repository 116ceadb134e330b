"""Data parallelism with real torchrun processes (gloo on CPU) on real JPEGs.

- A 2-process run equals a 1-process run with the same global batch: same weights after
  four SGD steps over two reshuffled epochs, same validation errors. The model is ResNet-20
  with its batch norm removed: per-device batch statistics are the one thing that legitimately
  differs, and PyTorch's SyncBatchNorm, which would remove the difference, runs on CUDA only.
- Distributed evaluation counts each image once on a set of 21 images (not divisible by 2).
- Gradient accumulation under DDP all-reduces on the last micro-step only (no_sync).
- Elastic restart: a worker killed mid-epoch is restarted by torchrun (--max-restarts=1) and
  the run resumes from the last checkpoint without losing a finished epoch.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from canon.engine.distributed import (
    DistributedContext,
    ShardSampler,
    all_reduce_sum,
    elastic_restart_count,
    eval_sampler,
    init_distributed,
    launched_by_torchrun,
    sync_context,
    train_sampler,
    unwrap_model,
    wrap_model,
)
from canon.errors import ConfigError
from canon.registry import create_model

pytestmark = pytest.mark.distributed

VAL_IMAGES = 21  # not divisible by the world size
SINGLE = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

# Trains a batch-norm-free ResNet-20 with canon's trainer, then checks the evaluation shards.
WORKER = '''
import json, sys
from pathlib import Path
import torch, torch.nn as nn
from canon.data import build_datasets
from canon.engine import distributed as dist
from canon.engine.trainer import train
from canon.recipes import load_recipe
from canon.registry import create_model

data, out, batch_size = sys.argv[1], sys.argv[2], sys.argv[3]
recipe = load_recipe("quickstart", [
    f"data.dataset={data}", "data.mean=imagenet", f"train.batch_size={batch_size}",
    "train.epochs=2",
])

def without_batch_norm(module):
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        else:
            without_batch_norm(child)
    return module

# Which validation images each rank evaluates, summed over ranks. (Before training: the
# trainer joins the process group if it is not joined yet and leaves it when done.)
ctx = dist.init_distributed("cpu")
_, val_set = build_datasets(recipe.data)
sampler = dist.eval_sampler(val_set, ctx)
indices = list(sampler) if sampler is not None else list(range(len(val_set)))
seen = torch.zeros(len(val_set), dtype=torch.long)
seen[indices] += 1
seen = dist.all_reduce_sum(seen, ctx)
if ctx.is_main:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "seen.json").write_text(json.dumps(seen.tolist()))

torch.manual_seed(0)
model = without_batch_norm(create_model("resnet20", num_classes=10))
train(recipe, out, model=model, device="cpu", progress=False)
'''


# Three accumulation micro-steps under DDP: the gradient all-reduce must run on the last only.
NO_SYNC_WORKER = '''
import json, sys
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from canon.engine import distributed as dist

ctx = dist.init_distributed("cpu")
torch.manual_seed(0)
model = dist.wrap_model(torch.nn.Linear(4, 2), ctx)
all_reduces = []

def counting_hook(state, bucket):
    all_reduces.append(1)
    return allreduce_hook(state, bucket)

model.register_comm_hook(None, counting_hook)
images = torch.full((2, 4), float(ctx.rank + 1))
for micro_step in range(3):
    with dist.sync_context(model, sync=micro_step == 2):
        model(images).sum().backward()
result = {"all_reduces": len(all_reduces), "grad": model.module.weight.grad.tolist()}
with open(f"{sys.argv[1]}.{ctx.rank}.json", "w") as file:
    json.dump(result, file)
dist.shutdown_distributed(ctx)
'''


def _environment(cache: Path) -> dict[str, str]:
    env = dict(os.environ, CANON_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CANON_DEBUG", None)
    return env


def _torchrun(nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *extra]


def _link_images(source: Path, target: Path, count: int) -> None:
    """The first `count` images of `source` (class by class, round robin), linked into `target`."""
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    files = {c.name: sorted(c.glob("*.JPEG")) for c in classes}
    taken = 0
    for index in range(max(len(f) for f in files.values())):
        for name, images in files.items():
            if taken == count:
                return
            if index < len(images):
                (target / name).mkdir(parents=True, exist_ok=True)
                (target / name / images[index].name).symlink_to(images[index])
                taken += 1


@pytest.fixture(scope="module")
def tiny_imagenet(imagenette_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 training and 21 validation JPEGs of Imagenette in the ImageNet folder layout."""
    root = tmp_path_factory.mktemp("tiny-imagenet")
    _link_images(imagenette_root / "train", root / "train", 64)
    _link_images(imagenette_root / "val", root / "val", VAL_IMAGES)
    return root


@pytest.fixture(scope="module")
def one_and_two_process_runs(
    tiny_imagenet: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The same global batch of 32: one process of 32, then two torchrun processes of 16."""
    work = tmp_path_factory.mktemp("ddp")
    script = work / "worker.py"
    script.write_text(WORKER)
    env = _environment(work / "cache")
    single, double = work / "one-process", work / "two-processes"
    commands = [
        [sys.executable, str(script), str(tiny_imagenet), str(single), "32"],
        [*_torchrun(2), str(script), str(tiny_imagenet), str(double), "16"],
    ]
    for command in commands:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return single, double


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as file:
        return list(csv.DictReader(file))


def test_two_processes_train_like_one_with_the_same_global_batch(
    one_and_two_process_runs: tuple[Path, Path],
) -> None:
    single, double = one_and_two_process_runs
    expected = load_file(single / "model.safetensors")
    actual = load_file(double / "model.safetensors")
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-5, msg=key)
    # The comparison means something only if training moved the weights from their start.
    torch.manual_seed(0)
    start = create_model("resnet20", num_classes=10).state_dict()
    assert max((actual[k] - start[k]).abs().max().item() for k in actual) > 1e-3
    rows_single, rows_double = _metrics(single), _metrics(double)
    assert [r["epoch"] for r in rows_double] == ["1", "2"]
    for one, two in zip(rows_single, rows_double, strict=True):
        assert float(two["train_loss"]) == pytest.approx(float(one["train_loss"]), rel=1e-5)
        assert two["val_top1_error"] == one["val_top1_error"]
        assert two["val_top5_error"] == one["val_top5_error"]


def test_distributed_evaluation_counts_each_image_once(
    one_and_two_process_runs: tuple[Path, Path],
) -> None:
    _, double = one_and_two_process_runs
    assert json.loads((double / "seen.json").read_text()) == [1] * VAL_IMAGES


def test_accumulation_all_reduces_on_the_last_micro_step_only(tmp_path: Path) -> None:
    script = tmp_path / "no_sync.py"
    script.write_text(NO_SYNC_WORKER)
    done = subprocess.run(
        [*_torchrun(2), str(script), str(tmp_path / "result")],
        env=_environment(tmp_path / "cache"), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"result.{rank}.json").read_text())
        assert result["all_reduces"] == 1
        # Each rank's 3 micro-steps sum 2 images of value rank + 1; the ranks' mean is 9.
        assert result["grad"] == [[9.0] * 4] * 2


@pytest.mark.parametrize("size", [0, 1, 5, 21, 64])
@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_shards_cover_every_index_once(size: int, world_size: int) -> None:
    shards = [list(ShardSampler(size, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_single_process_is_plain_pytorch() -> None:
    ctx = init_distributed("cpu")
    assert ctx == SINGLE and ctx.is_main
    assert not launched_by_torchrun() and elastic_restart_count() == 0
    model = torch.nn.Linear(3, 2)
    assert wrap_model(model, ctx) is model and unwrap_model(model) is model
    assert train_sampler(range(10), ctx, seed=0) is None and eval_sampler(range(10), ctx) is None
    torch.testing.assert_close(all_reduce_sum(torch.ones(2), ctx), torch.ones(2))
    with sync_context(model, sync=False):
        pass
    with pytest.raises(ConfigError, match="unknown device"):
        init_distributed("tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            init_distributed("cuda")


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            output = process.communicate()[0] if process.poll() is not None else ""
            pytest.fail(f"{path} never appeared; torchrun output:\n{output[-3000:]}")
        time.sleep(0.02)


def _worker_of_rank(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=`rank` (Linux /proc)."""
    children = []
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        children += (task / "children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers via /proc")
def test_elastic_restart_resumes_from_the_last_checkpoint(
    imagenette_root: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    _link_images(imagenette_root / "train", data / "train", 192)
    _link_images(imagenette_root / "val", data / "val", VAL_IMAGES)
    run = tmp_path / "run"
    command = [
        *_torchrun(2, "--max-restarts=1"), "-m", "canon", "train", "--data", str(data),
        "--set", "data.mean=imagenet", "--batch-size", "4", "--epochs", "2",
        "--output-dir", str(run),
    ]
    process = subprocess.Popen(
        command, env=_environment(tmp_path / "cache"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    try:
        # curves.png is written after epoch 1's checkpoint and metrics; epoch 2 starts next.
        _wait_for(run / "curves.png", process)
        first_epoch = _metrics(run)[0]
        time.sleep(float(first_epoch["seconds"]) / 2)  # about half-way through epoch 2
        assert not (run / "checkpoints" / "epoch-002.pt").exists(), "killed too late"
        os.kill(_worker_of_rank(process.pid, 1), signal.SIGKILL)
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "resuming at epoch 1 + 0 steps" in output, output[-3000:]
    rows = _metrics(run)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert rows[0] == first_epoch  # the finished epoch survived the restart unchanged
    assert (run / "model.safetensors").exists()
