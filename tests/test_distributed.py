"""Data parallelism with real torchrun processes (gloo on CPU) on real JPEGs.

- A 2-process run equals a 1-process run with the same global batch: same weights after
  four SGD steps over two reshuffled epochs, same validation errors. The model is ResNet-20
  with its batch norm removed: per-device batch statistics are the one thing that legitimately
  differs, and PyTorch's SyncBatchNorm, which would remove the difference, runs on CUDA only.
  It computes in float64: batches of 16 and 32 go through different convolution kernels whose
  float32 rounding differs (about 1e-7), and four steps of this BN-free net amplify that to
  1e-5..1e-4 (NCHW against channels_last on one process differ as much), so a float32
  comparison passes or fails with the CPU's kernel choice. In float64 the two agree to 1e-16.
  The data are normalised by the training set's mean image (data.mean=pixel, as the papers'
  recipes are), which rank 0 computes and caches while rank 1 waits and then reads it.
- Distributed evaluation counts each image once on a set of 21 images (not divisible by 2).
- With batch norm, dropout and EMA: every rank validates with rank 0's buffers (the saved
  model's), and a run interrupted mid-epoch and resumed on 2 processes ends bit-identical to
  an uninterrupted one (each rank gets its own random state and epoch sums back).
- Gradient accumulation under DDP all-reduces on the last micro-step only (no_sync).
- Elastic restart: a worker killed mid-epoch is restarted by torchrun (--max-restarts=1) and
  the run resumes from the last checkpoint without losing a finished epoch.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from canon import cli
from canon.data.folders import UndecodableImageWarning
from canon.data.sampling import ShardSampler, ShuffleSampler, epoch_order, eval_shard
from canon.devices import resolve_device
from canon.engine import checkpoint as ckpt
from canon.engine import distributed
from canon.engine.distributed import (
    DistributedContext,
    all_reduce_sum,
    elastic_restart_count,
    elastic_run_id,
    init_distributed,
    sync_context,
    wrap_model,
)
from canon.engine.rundir import plan_run
from canon.engine.stopping import loader_worker_init
from canon.engine.trainer import train
from canon.errors import ConfigError
from canon.models.factory import create_model
from canon.recipes import apply_overrides
from canon.torchrun import launched_by_torchrun

pytestmark = pytest.mark.distributed

VAL_IMAGES = 21  # not divisible by the world size
SINGLE = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

# Trains a batch-norm-free ResNet-20 with canon's trainer, then checks the evaluation shards.
WORKER = '''
import json, sys
from pathlib import Path
import torch, torch.nn as nn
import canon.data.stats
import canon.engine.trainer
from canon.engine import distributed as dist
from canon.engine.trainer import train
from canon.recipes import load_recipe
from canon.models.factory import create_model

data, out, batch_size = sys.argv[1], sys.argv[2], sys.argv[3]
recipe = load_recipe("quickstart", [
    f"data.dataset={data}", "data.mean=pixel", f"train.batch_size={batch_size}",
    "train.epochs=2",
])

def without_batch_norm(module):
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        else:
            without_batch_norm(child)
    return module

ctx = dist.init_distributed("cpu")  # the trainer uses this process group and leaves it be
Path(out).mkdir(parents=True, exist_ok=True)
# Which validation images the trainer's validation scored on each rank, at its last epoch.
score_loader = canon.engine.trainer.score_loader
def recording_score_loader(model, loader, *args, **kwargs):
    errors = score_loader(model, loader, *args, **kwargs)
    (Path(out) / f"validated-by-rank-{ctx.rank}.json").write_text(json.dumps(
        {"indices": list(loader.sampler), "images": errors.images}))
    return errors
canon.engine.trainer.score_loader = recording_score_loader

# Which ranks compute the training set's statistics (the others should read rank 0's cache).
compute_stats = canon.data.stats.compute_stats
def recording_compute_stats(*args, **kwargs):
    (Path(out) / f"statistics-computed-by-rank-{ctx.rank}").touch()
    return compute_stats(*args, **kwargs)
canon.data.stats.compute_stats = recording_compute_stats

torch.manual_seed(0)
model = without_batch_norm(create_model("resnet20", num_classes=10)).double()
model.register_forward_pre_hook(lambda module, inputs: (inputs[0].double(),))
train(recipe, out, model=model, device="cpu", progress=False)
dist.shutdown_distributed(ctx)
'''


# Three accumulation micro-steps under DDP: the gradient all-reduce must run on the last only.
# It runs in the launch of NON_FINITE_WORKER, before that (a launch costs two cores about
# 17 s, its three processes importing torch).
NO_SYNC_WORKER = '''
import json, sys
import torch
from canon.engine import distributed as dist

ctx = dist.init_distributed("cpu")
torch.manual_seed(0)
model = dist.wrap_model(torch.nn.Linear(4, 2), ctx)
all_reduces = []

def counting_hook(state, bucket):
    """DDP's averaging all-reduce, counted, run in the backward's own thread. torch's
    allreduce_hook ends in a Future.then callback, Python that gloo's threads run; with it
    about one launch in 70 aborted at exit ("terminate called without an active
    exception"), the mark of a thread that takes the GIL while Python finalises."""
    all_reduces.append(1)
    gradients = bucket.buffer().div_(ctx.world_size)
    torch.distributed.all_reduce(gradients)
    reduced = torch.futures.Future()
    reduced.set_result(gradients)
    return reduced

model.register_comm_hook(None, counting_hook)
images = torch.full((2, 4), float(ctx.rank + 1))
for micro_step in range(3):
    with dist.sync_context(model, sync=micro_step == 2):
        model(images).sum().backward()
result = {"all_reduces": len(all_reduces), "grad": model.module.weight.grad.tolist()}
with open(f"{sys.argv[1]}/no-sync-{ctx.rank}.json", "w") as file:
    json.dump(result, file)
dist.shutdown_distributed(ctx)
'''


# Batch norm, dropout and EMA under DDP: a run straight through, one stopped by Ctrl-C in
# epoch 2, and its resumption. Records the buffers of the model each rank validates. Importable
# (the test resumes its stopped run on one process with the same model and data).
STATE_WORKER = '''
import shutil, signal, sys
from pathlib import Path
import torch, torch.nn as nn
from canon.data import ArrayImages, DataConfig, Datasets, build_datasets
from canon.engine import distributed as dist
from canon.engine import trainer
from canon.models.base import CanonModel
from canon.recipes import load_recipe

RECIPE = load_recipe("quickstart", [
    ("train.batch_size", 8), ("train.epochs", 2), ("train.ema_decay", 0.5),
    ("train.channels_last", False),
])


class BatchNormDropoutNet(CanonModel):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4)
        )
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(8, num_classes)

    @property
    def stages(self):
        return [("conv1", self.conv1)]

    def forward_head(self, x, pre_logits=False):
        x = self.dropout(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)


def datasets():
    """64 training images (4 steps of 2 x 8 per epoch) and 21 test images of the sample."""
    sets = build_datasets(DataConfig(dataset="sample", mean="imagenet"))
    parts = []
    for dataset, count in ((sets.train, 64), (sets.val, 21)):
        index = torch.linspace(0, len(dataset) - 1, count).long()
        parts.append(ArrayImages(dataset.images[index],
                                 [dataset.labels[i] for i in index.tolist()], dataset.classes,
                                 name="part", transform=dataset.transform))
    return Datasets(*parts, sets.preprocess)


def model():
    torch.manual_seed(0)
    return BatchNormDropoutNet()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    ctx = dist.init_distributed("cpu")  # one process group for the three runs
    data = datasets()
    records = []  # (run, buffers of the model validated (EMA), buffers of the raw model)
    validate = trainer.validate

    def recording_validate(validated, *args):
        buffers = [{k: v.clone() for k, v in m.named_buffers()} for m in (validated, net)]
        records.append((run, *buffers))
        return validate(validated, *args)

    trainer.validate = recording_validate

    def ctrl_c(step):
        if step == 6 and ctx.rank == 0:  # epoch 2, after 2 of its 4 steps; one rank's signal
            signal.raise_signal(signal.SIGINT)

    for run, resume, on_step in (("straight", None, None), ("stopped", None, ctrl_c),
                                 ("stopped", out / "stopped", None)):
        net = model()
        try:
            trainer.train(RECIPE, out / run, resume=resume, model=net, datasets=data,
                          device="cpu", progress=False, on_step=on_step)
        except trainer.TrainingInterrupted as stop:
            if ctx.is_main:
                shutil.copy(stop.checkpoint, out / "interrupted-2-processes.pt")
    torch.save(records, out / f"validated-by-rank-{ctx.rank}.pt")
    dist.shutdown_distributed(ctx)
'''


def _environment(cache: Path) -> dict[str, str]:
    # PYTHONFAULTHANDLER: a worker that aborts prints every thread's Python stack.
    env = dict(os.environ, CANON_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONFAULTHANDLER="1")
    env.pop("CANON_DEBUG", None)
    return env


def _torchrun(nproc: int, *extra: str, static: bool = False) -> list[str]:
    """torchrun on this machine: --standalone (a run id of the launch's own) or, `static`,
    the static rendezvous of --master-addr/--master-port, whose run id is "none"."""
    if static:
        with socket.socket() as probe:  # a free port for the launch's store
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        rendezvous = ["--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={port}"]
    else:
        rendezvous = ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous,
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
    single, double = work / "one-process", work / "two-processes"
    commands = [
        [sys.executable, str(script), str(tiny_imagenet), str(single), "32"],
        [*_torchrun(2), str(script), str(tiny_imagenet), str(double), "16"],
    ]
    for command, cache in zip(commands, ("cache-1", "cache-2"), strict=True):
        done = subprocess.run(  # a cache each: both runs compute the statistics
            command, env=_environment(work / cache), capture_output=True, text=True, timeout=300
        )
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
        difference = (actual[key] - value).abs().max().item()
        assert difference < 1e-12, f"{key}: 1 and 2 processes differ by up to {difference:.3g}"
    # The comparison means something only if training moved the weights from their start.
    torch.manual_seed(0)
    start = create_model("resnet20", num_classes=10).state_dict()
    assert max((actual[k] - start[k]).abs().max().item() for k in actual) > 1e-3
    rows_single, rows_double = _metrics(single), _metrics(double)
    assert [r["epoch"] for r in rows_double] == ["1", "2"]
    for one, two in zip(rows_single, rows_double, strict=True):
        assert float(two["train_loss"]) == pytest.approx(float(one["train_loss"]), rel=1e-12)
        assert two["val_top1_error"] == one["val_top1_error"]
        assert two["val_top5_error"] == one["val_top5_error"]


def test_rank_0_computes_the_statistics_and_the_other_rank_reads_its_cache(
    one_and_two_process_runs: tuple[Path, Path],
) -> None:
    for run_dir in one_and_two_process_runs:
        computed = sorted(p.name for p in run_dir.glob("statistics-computed-by-rank-*"))
        assert computed == ["statistics-computed-by-rank-0"]
        mean = load_file(run_dir / "normalization.safetensors")["mean"]
        assert mean.shape == (3, 32, 32)  # a mean image: data.mean=pixel


def test_distributed_evaluation_counts_each_image_once(
    one_and_two_process_runs: tuple[Path, Path],
) -> None:
    for run_dir in one_and_two_process_runs:
        scored = [json.loads(path.read_text())
                  for path in sorted(run_dir.glob("validated-by-rank-*.json"))]
        indices = [index for rank in scored for index in rank["indices"]]
        assert sorted(indices) == list(range(VAL_IMAGES))  # each image on one rank only
        assert sum(rank["images"] for rank in scored) == VAL_IMAGES
    assert len(list(run_dir.glob("validated-by-rank-*.json"))) == 2  # the two-process run


def test_accumulation_all_reduces_on_the_last_micro_step_only(no_sync_then_non_finite: Path
                                                            ) -> None:
    for rank in range(2):
        result = json.loads((no_sync_then_non_finite / f"no-sync-{rank}.json").read_text())
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
    assert wrap_model(model, ctx) is model
    with pytest.warns(UserWarning, match="--sync-bn .* no effect in a single process"):
        assert wrap_model(model, ctx, sync_batchnorm=True) is model
    assert isinstance(epoch_order(10, seed=0), ShuffleSampler) and eval_shard(10, 0, 1) is None
    torch.testing.assert_close(all_reduce_sum(torch.ones(2), ctx), torch.ones(2))
    with sync_context(model, sync=False):
        pass
    with pytest.raises(ConfigError, match="unknown device"):
        init_distributed("tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            init_distributed("cuda")



def test_a_gpu_index_beyond_the_machine_s_is_named(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match=r"device 'cuda:2': this machine shows 2 GPU\(s\), "
                                          "cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_accumulation_skips_the_all_reduce_of_a_compiled_ddp_model(tmp_path) -> None:
    """train.compile wraps the DDP model in torch.compile's module, whose no_sync is DDP's."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                                         rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
        for model in (ddp, torch.compile(ddp)):
            with sync_context(model, sync=False):
                assert not ddp.require_backward_grad_sync
            with sync_context(model, sync=True):
                assert ddp.require_backward_grad_sync
    finally:
        torch.distributed.destroy_process_group()


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


def test_a_rank_whose_micro_batch_is_all_undecodable_stops_every_rank_with_the_reason(
    imagenette_root: Path, tmp_path: Path
) -> None:
    """Four training files, one decodable, over two ranks of one micro-batch of 2: one rank's
    batch holds only bad files, whichever order the sampler draws. Skipping it alone would
    leave the other rank waiting in its gradient all-reduce. Each rank shows the files it
    failed to decode; a warning every rank would give (of the recipe) comes once."""
    data = tmp_path / "data"
    _link_images(imagenette_root / "val", data / "val", 4)
    classes = sorted(p.name for p in (data / "val").iterdir())
    for index, name in enumerate(classes[:2] * 2):
        target = data / "train" / name / f"{index}.JPEG"
        target.parent.mkdir(parents=True, exist_ok=True)
        if index == 0:
            target.symlink_to(next((data / "val" / name).iterdir()).resolve())
        else:
            target.write_bytes(b"not a JPEG at all")
    for extra in classes[2:]:  # val's other classes would be unknown to the training set
        shutil.rmtree(data / "val" / extra)
    result = subprocess.run(
        [*_torchrun(2), "-m", "canon", "train", "--data", str(data), "--set",
         "data.mean=imagenet", "--set", "train.polyak_after_epochs=3", "--batch-size", "2",
         "--epochs", "1", "--workers", "0", "--output-dir", str(tmp_path / "run")],
        env=_environment(tmp_path / "cache"), capture_output=True, text=True, timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "every file of a micro-batch of 2 was undecodable" in output
    undecoded = re.findall(r"UndecodableImageWarning: skipping .*/train/.*/(\d)\.JPEG:", output)
    assert sorted(undecoded) == ["1", "2", "3"], output[-3000:]
    assert output.count("train.polyak_after_epochs 3: the run ends") == 1, output[-3000:]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers via /proc")
def test_an_elastic_restart_of_a_resumed_run_goes_on_from_where_it_got_to(
    quickstart_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart replays the command, --resume included: from epoch 1's checkpoint (the run's
    own, or into another --output-dir that has saved epoch 2 since), it must go on from the
    newest checkpoint its launch saved, not go back (refused as older, or as a directory
    holding a run). Another launch's checkpoints are not its to go on from: the restart runs
    as the first attempt did (which a folder holding a run refuses)."""
    run, branch = tmp_path / "run", tmp_path / "branch"
    shutil.copytree(quickstart_run / "checkpoints", run / "checkpoints")
    first, second = run / "checkpoints" / "epoch-001.pt", run / "checkpoints" / "epoch-002.pt"
    saved = ckpt.load_checkpoint(second)
    for folder in (run, branch):  # epoch 2, saved by the first attempt of this launch
        ckpt.save_checkpoint({**saved, "launch": "this-launch"}, ckpt.epoch_checkpoint(folder, 2))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "this-launch")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    for output_dir, run_dir in ((None, run), (branch, branch)):
        plan = plan_run(None, [], resume=str(first), output_dir=output_dir)
        assert (plan.run_dir, plan.state["epoch"]) == (run_dir, 2)
    ckpt.save_checkpoint({**saved, "launch": "an-earlier-launch"}, ckpt.epoch_checkpoint(branch, 2))
    assert plan_run(None, [], resume=str(first), output_dir=branch).state["epoch"] == 1
    assert plan_run(None, [], output_dir=branch).state is None
    ckpt.save_checkpoint({**saved, "launch": "this-launch"}, ckpt.epoch_checkpoint(branch, 2))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # the first start: as asked
    assert plan_run(None, [], resume=str(first), output_dir=branch).state["epoch"] == 1


# The static rendezvous's restart: its run id ("none") is covered by the store's unit tests and
# by test_a_static_rendezvous_restart_does_not_take_an_earlier_launch_s_run's real restart, so
# its resume runs with `pytest -m slow` (22 s of launches on two cores).
@pytest.mark.parametrize("static", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["standalone", "static-rendezvous"])
def test_elastic_restart_resumes_from_the_last_checkpoint(
    imagenette_root: Path, tmp_path: Path, static: bool
) -> None:
    data = tmp_path / "data"
    _link_images(imagenette_root / "train", data / "train", 192)
    _link_images(imagenette_root / "val", data / "val", VAL_IMAGES)
    run = tmp_path / "run"
    command = [
        *_torchrun(2, "--max-restarts=1", static=static), "-m", "canon", "train", "--data",
        str(data),
        "--set", "data.mean=imagenet", "--batch-size", "4", "--epochs", "2",
        "--output-dir", str(run),
    ]
    process = subprocess.Popen(
        command, env=_environment(tmp_path / "cache"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    try:
        # metrics.csv is written after epoch 1's checkpoint; epoch 2 starts next.
        _wait_for(run / "metrics.csv", process)
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


@pytest.fixture
def torchrun_store(monkeypatch: pytest.MonkeyPatch) -> torch.distributed.TCPStore:
    """A store standing in for torchrun's agent's, in the environment torchrun gives its
    workers (launch "job", first attempt)."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in (("TORCHELASTIC_RUN_ID", "job"), ("TORCHELASTIC_USE_AGENT_STORE", "True"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(store.port)),
                        ("TORCHELASTIC_RESTART_COUNT", "0")):
        monkeypatch.setenv(name, value)
    return store


def test_each_join_and_restart_gets_keys_of_its_own_in_torchrun_s_store(
    torchrun_store: torch.distributed.TCPStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch names every new default process group alike: a second join (canon.train called
    again in the process) or a restart reading the first's keys would connect to addresses
    that are gone."""
    first = distributed._attempt_store()
    first.set("0/rank_1", "a dead worker's address")
    again = distributed._attempt_store()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = distributed._attempt_store()
    for later in (again, restarted):
        assert not later.check(["0/rank_1"])
        later.set("0/rank_1", "this join's")
    assert first.get("0/rank_1") == b"a dead worker's address"


def test_a_launch_without_a_run_id_of_its_own_keeps_one_in_torchrun_s_store(
    torchrun_store: torch.distributed.TCPStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torchrun's run id is "none" without --rdzv-id: canon draws one, which the launch's
    restarts find in torchrun's store; a store of another launch holds another."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    connect, connected = distributed._store_client, []
    monkeypatch.setattr(distributed, "_store_client",
                        lambda *address: connected.append(address) or connect(*address))
    distributed._launch_id_in_store.cache_clear()  # another test's stores may have had the port
    try:
        first = elastic_run_id()
        assert len(first) == 12 and first != "none"
        assert torchrun_store.get("canon/launch-id").decode() == first  # a restart reads it
        assert elastic_run_id() == first and len(connected) == 1  # asked once (every save asks)
        other = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True,
                                           wait_for_workers=False)
        monkeypatch.setenv("MASTER_PORT", str(other.port))
        assert elastic_run_id() not in (first, "none")
    finally:
        distributed._launch_id_in_store.cache_clear()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # etcd: no store to keep it
    with pytest.warns(UserWarning, match="run id is 'none' and it shares no store"):
        assert elastic_run_id() == "none"


def test_an_error_every_rank_meets_is_printed_by_rank_0_and_the_first_other(
    torchrun_store: torch.distributed.TCPStore, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An error in the recipe or the data stops every rank alike: rank 0 prints it, and so does
    the first other rank to meet it (counted in torchrun's store); the others exit without.
    Another error prints, and so does the same one in an elastic restart."""
    monkeypatch.delenv("CANON_DEBUG", raising=False)

    def printed(rank: str, *argv: str) -> str:
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_:
            cli.main(list(argv))
        assert exit_.value.code == 2
        return capsys.readouterr().err

    unknown = ("train", "--recipe", "no-such-recipe")
    first = printed("2", *unknown)
    assert first.startswith("canon train: error: ") and "no-such-recipe" in first
    assert printed("1", *unknown) == ""  # another rank of the same attempt
    assert printed("0", *unknown) == first  # rank 0 always: its output may be all that is kept
    assert "no-other-recipe" in printed("1", "train", "--recipe", "no-other-recipe")
    assert printed("1", "eval", "run").startswith("canon eval: error: ")  # any verb's error
    assert "RANK='one'" in printed("one", *unknown)  # said, though RANK names no rank
    not_utf8 = os.fsdecode(b"/no/such/d\xe9ta")  # a file name of other bytes than UTF-8's
    assert distributed.first_to_meet(f"{not_utf8}: not a folder")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert printed("1", *unknown) == first


def test_an_error_is_printed_at_once_where_torchrun_s_store_is_gone_or_hung(
    torchrun_store: torch.distributed.TCPStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process is ending: a dead agent (nothing listens) or a hung one (it accepts, never
    answers) must not keep it, nor stop its error from being printed."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        gone = closed.getsockname()[1]
    monkeypatch.setenv("MASTER_PORT", str(gone))
    assert distributed.first_to_meet("an error")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        monkeypatch.setenv("MASTER_PORT", str(hung.getsockname()[1]))
        started = time.monotonic()
        assert distributed.first_to_meet("an error")
        assert time.monotonic() - started < 10


def test_a_rank_other_than_0_warns_only_of_the_files_it_failed_to_decode() -> None:
    """The others, of the same recipe, data and checkpoint, rank 0 shows once for all."""
    with warnings.catch_warnings(record=True) as shown:
        cli._show_only_this_process_s_own_warnings()
        warnings.warn("the run ends before its warm-up does", UserWarning, stacklevel=1)
        warnings.warn("skipping a.JPEG: not an image", UndecodableImageWarning, stacklevel=1)
    assert [str(w.message) for w in shown] == ["skipping a.JPEG: not an image"]


def _warn_of_the_recipe_and_of_a_file(worker_id: int) -> None:
    """Writes the warnings shown to fd 2 (a forked worker inherits pytest's recorder)."""
    with warnings.catch_warnings(record=True) as shown:
        warnings.warn("the run ends before its warm-up does", UserWarning, stacklevel=1)
        warnings.warn("skipping a.JPEG: not an image", UndecodableImageWarning, stacklevel=1)
    os.write(2, "".join(f"shown: {warning.message}\n" for warning in shown).encode())


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_loader_workers_of_a_rank_other_than_0_warn_as_it_does_however_started(
    start: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A spawned worker (macOS, Python 3.14's forkserver) starts from Python's own filters, not
    from its process's: without them it would show every warning a rank's data gives."""
    with warnings.catch_warnings():
        cli._show_only_this_process_s_own_warnings()
        # A module's name as a plain string, as Python's own filters hold one: no regex.
        warnings.filters.insert(0, ("ignore", None, UserWarning, "a.module(", 0))
        loader = torch.utils.data.DataLoader(
            range(2), num_workers=1, multiprocessing_context=start,
            worker_init_fn=loader_worker_init(_warn_of_the_recipe_and_of_a_file))
        assert list(loader)
    shown = capfd.readouterr().err
    assert "shown: skipping a.JPEG: not an image" in shown and "warm-up" not in shown, shown


def test_a_torchrun_launch_prints_an_error_of_its_three_ranks_on_rank_0_and_once_more_at_most(
    tmp_path: Path,
) -> None:
    """torchrun's own store and environment, as the test above stands them in for."""
    done = subprocess.run(
        [*_torchrun(3, "--tee=2"), "-m", "canon", "train", "--recipe", "no-such-recipe"],
        env=_environment(tmp_path / "cache"), capture_output=True, text=True, timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert output.count("[default0]:canon train: error: unknown recipe") == 1, output[-3000:]
    assert output.count("canon train: error: ") in (1, 2), output[-3000:]


def test_a_static_rendezvous_restart_does_not_take_an_earlier_launch_s_run(
    quickstart_run: Path, tmp_path: Path
) -> None:
    """Under the static rendezvous torchrun's run id is "none" for every launch, as canon once
    recorded it. A launch into an earlier one's run is refused (no --overwrite), and so must
    its restart be, which used to resume that run as the launch's own. One process: the run id
    is the launch's, whatever its number of processes."""
    run = tmp_path / "run"
    shutil.copytree(quickstart_run, run)
    newest = ckpt.epoch_checkpoint(run, 2)
    ckpt.save_checkpoint({**ckpt.load_checkpoint(newest), "launch": "none"}, newest)
    done = subprocess.run(
        [*_torchrun(1, "--max-restarts=1", static=True), "-m", "canon", "train", "--device",
         "cpu", "--output-dir", str(run)],
        env=_environment(tmp_path / "cache"), capture_output=True, text=True, timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "resuming" not in output, output[-3000:]
    assert output.count(f"{run} already holds a run") >= 2, output[-3000:]  # both attempts
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        p.name for p in sorted((quickstart_run / "checkpoints").iterdir())]


@pytest.fixture(scope="module")
def batch_norm_dropout_runs(tmp_path_factory: pytest.TempPathFactory):
    """STATE_WORKER under torchrun: its output folder and the worker imported as a module."""
    work = tmp_path_factory.mktemp("ddp-state")
    (work / "ddp_state_worker.py").write_text(STATE_WORKER)
    done = subprocess.run(
        [*_torchrun(2), str(work / "ddp_state_worker.py"), str(work)],
        env=_environment(work / "cache"), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming at epoch 1 + 2 steps" in done.stdout
    sys.path.insert(0, str(work))
    try:
        worker = importlib.import_module("ddp_state_worker")
    finally:
        sys.path.remove(str(work))
    return work, worker


def test_every_rank_validates_with_rank_0_s_batch_norm_statistics(batch_norm_dropout_runs):
    work, _ = batch_norm_dropout_runs
    rank0, rank1 = (torch.load(work / f"validated-by-rank-{r}.pt") for r in range(2))
    assert [run for run, _, _ in rank0] == ["straight"] * 2 + ["stopped"] * 2
    for (run, *buffers), (_, *buffers1) in zip(rank0, rank1, strict=True):
        for model, model1 in zip(buffers, buffers1, strict=True):  # EMA, then the raw model
            for key in ("conv1.1.running_mean", "conv1.1.running_var"):
                assert torch.equal(model[key], model1[key]), (run, key)
    # What they validated is what rank 0 saved, and training did move the statistics.
    saved = ckpt.load_checkpoint(ckpt.epoch_checkpoint(work / "straight", 2))
    _, ema, raw = rank0[1]
    for key, value in ema.items():
        assert torch.equal(saved["ema"][f"module.{key}"], value), key
    for key, value in raw.items():
        assert torch.equal(saved["model"][key], value), key
    assert not torch.equal(raw["conv1.1.running_mean"], torch.zeros(8))


def test_a_resumed_two_process_run_restores_each_rank_s_random_state_and_sums(
    batch_norm_dropout_runs,
):
    work, _ = batch_norm_dropout_runs
    straight, resumed = (
        ckpt.load_checkpoint(ckpt.epoch_checkpoint(work / run, 2))
        for run in ("straight", "stopped")
    )
    for key, tensor in straight["model"].items():  # dropout masks as in the straight run
        assert torch.equal(tensor, resumed["model"][key]), key
    for row, again in zip(_metrics(work / "straight"), _metrics(work / "stopped"), strict=True):
        # epoch 2's loss and error sum both ranks' 2 steps before and 2 after the interruption
        for key in ("train_loss", "train_top1_error", "val_top1_error", "val_top5_error"):
            assert row[key] == again[key], key
    interrupted = ckpt.load_checkpoint(work / "interrupted-2-processes.pt")
    # Rank 0 alone was signalled: both stopped after that very step (CPU ranks agree at every
    # step), not at the epoch's end.
    assert (interrupted["epoch"], interrupted["step_in_epoch"]) == (1, 2)
    assert len(interrupted["rng"]) == len(interrupted["epoch_totals"]) == 2
    assert not torch.equal(interrupted["rng"][0]["torch"], interrupted["rng"][1]["torch"])


def test_resuming_on_another_number_of_processes_reseeds_each_rank(
    batch_norm_dropout_runs, tmp_path, capsys
):
    work, worker = batch_norm_dropout_runs
    checkpoint = work / "interrupted-2-processes.pt"
    with pytest.raises(ConfigError, match=r"global batch 8 \(8 x 1 accum x 1 process\(es\)\): "
                       r"the checkpoint's \d+ steps were of 16 \(8 x 1 x 2\)"):
        train(worker.RECIPE, tmp_path / "halved", model=worker.model(), resume=checkpoint,
              datasets=worker.datasets(), device="cpu", progress=False)
    one_process = apply_overrides(worker.RECIPE, [("train.accum_steps", 2)])  # still 16
    final_rng_states = []
    for seed in (1, 2):  # whatever the global generator held before
        torch.manual_seed(seed)
        result = train(one_process, tmp_path / str(seed), model=worker.model(),
                       resume=checkpoint, datasets=worker.datasets(), device="cpu",
                       progress=False)
        assert [row["epoch"] for row in result.metrics] == [1, 2]
        final_rng_states.append(torch.get_rng_state())
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().out
    assert torch.equal(*final_rng_states)  # reseeded from (seed, rank, step) alone


NON_FINITE_WORKER = '''
import os, sys, torch
from pathlib import Path
from canon.engine.trainer import train
from canon.errors import NonFiniteError
from canon.models.factory import create_model
from canon.recipes import load_recipe

out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
# An epoch cut at 16 steps (2 iterations of the recipe's batch 128, 16 images a step): its
# end checks the weights, as a whole epoch's does.
recipe = load_recipe("quickstart", ["train.batch_size=8", "train.workers=0", "train.epochs=1",
                                    "train.iterations=2", "train.channels_last=false"])
model = create_model("resnet20", num_classes=10)

def poison(step):  # rank 0's tenth step computes a NaN loss; rank 1's is still finite
    if rank == 0 and step == 9:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))

try:
    train(recipe, out / "run", model=model, device="cpu", progress=False, on_step=poison)
except NonFiniteError as error:
    (out / f"rank-{rank}.txt").write_text(str(error))

model = create_model("resnet20", num_classes=10)
norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))

def overflow(step):  # rank 1's own BN statistics overflow; its loss and weights stay finite
    if rank == 1:
        norm.running_var.fill_(float("inf"))

try:
    train(recipe, out / "run-bn", model=model, device="cpu", progress=False, on_step=overflow)
except NonFiniteError as error:
    (out / f"bn-rank-{rank}.txt").write_text(str(error))
'''


@pytest.fixture(scope="module")
def no_sync_then_non_finite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NO_SYNC_WORKER, then NON_FINITE_WORKER, in the processes of one torchrun launch: the
    folder of their results."""
    work = tmp_path_factory.mktemp("no-sync-then-non-finite")
    script = work / "worker.py"
    script.write_text(NO_SYNC_WORKER + NON_FINITE_WORKER)
    done = subprocess.run([*_torchrun(2), str(script), str(work)], env=_environment(work / "c"),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work


def test_a_nan_loss_on_one_rank_stops_every_rank(no_sync_then_non_finite: Path) -> None:
    """The loss check after 10 steps sees the NaN on rank 0 only: rank 1 must stop too rather than
    wait for rank 0 in its next gradient all-reduce. Each run joins a process group of its own
    (the second reads none of the first's addresses, nor the third of the two before)."""
    tmp_path = no_sync_then_non_finite
    assert "the loss became nan at optimizer step 10;" in (tmp_path / "rank-0.txt").read_text()
    assert "on another process by optimizer step 10;" in (tmp_path / "rank-1.txt").read_text()
    # Non-finite weights on one rank, at the epoch's end (the check before its checkpoint):
    # every rank stops there, rather than wait for the other in the next collective.
    steps = re.match(r"the weights became NaN or infinite by optimizer step (\d+); stopping",
                     (tmp_path / "bn-rank-1.txt").read_text())[1]
    assert (tmp_path / "bn-rank-0.txt").read_text().startswith(
        f"the weights became NaN or infinite on another process by optimizer step {steps};")
