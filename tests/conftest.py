"""Shared fixtures: the real data in ../shared/data, unpacked once per machine; a tiny real
training run and sample images for the canon.visualize tests.

Where ../shared is absent (a user's clone) the tests that need it skip; in CI (the CI service
sets CI=true; .ci/run does not) it must be there, and its absence is a failure, not a skip.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sample_subsets import spread_subsets
from visualize_helpers import save_png

import canon
from canon.data import DataConfig, build_datasets
from canon.data.datasets import load_sample

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CANON_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = REPO / ".cache" / "test-data"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets its share of the cores, it and the processes it
    starts: torch's default of every core per process would have the workers fight for them."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        share = max(1, len(os.sched_getaffinity(0)) // int(workers))
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# Under -n auto the files are handed to the workers in collection order (pytest-xdist's
# --no-loadscope-reorder; by default it hands out the files of most tests first): these, the
# longest (20 s to 3.5 min of CPU each on two cores in session 50), go first, so that the run
# does not end with one worker on a long file while the others idle. Others keep their order.
LONGEST_FIRST = ("test_engine_training.py", "test_distributed.py", "test_cli_train.py",
                 "test_shard_training.py", "test_reproduce.py", "test_models.py",
                 "test_transfer.py", "test_model_parallel.py", "test_shards.py", "test_bench.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files whole


def _require_shared(path: Path) -> Path:
    if path.exists():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{path} is missing; CI must run with ../shared/data beside the clone")
    pytest.skip(f"{path} not present (set CANON_SHARED_DATA to the shared data folder)")


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """A folder holding `cifar-10-batches-py/` in the standard pickled format (all 60,000)."""
    script = _require_shared(SHARED_DATA / "unpack_cifar10.py")
    root = CACHE / "cifar10"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "cifar10.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest-xdist worker may be unpacking it
        if not (root / "cifar-10-batches-py" / "batches.meta").exists():
            subprocess.run([sys.executable, str(script), str(root)], check=True)
    return root


@pytest.fixture(scope="session")
def imagenette_root() -> Path:
    """1,500 real ImageNet JPEGs in the ImageNet layout: train/<wnid>/, val/<wnid>/."""
    return _require_shared(SHARED_DATA / "imagenette2-160-mini")


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """A real two-epoch quickstart run (ResNet-20) on 32 training and 16 test images of the
    bundled CIFAR-10 sample, trained once for every test that reads one."""
    sets = build_datasets(DataConfig(dataset="sample"))
    recipe = canon.load_recipe("quickstart", [
        ("train.epochs", 2), ("train.batch_size", 16), ("train.channels_last", False),
    ])
    folder = tmp_path_factory.mktemp("runs") / "resnet20-tiny"
    canon.train(recipe, folder, device="cpu", progress=False,
                datasets=spread_subsets(sets, 32, 16))
    return folder


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> list[Path]:
    """Two CIFAR-10 sample test images (32x32) as PNG files."""
    folder = tmp_path_factory.mktemp("images")
    sample = load_sample("test")
    return [save_png(folder / f"test{i}.png", sample.load_image(i)) for i in (3, 17)]


@pytest.fixture
def random_torchvision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """torchvision's models with random weights in place of the downloaded ones (no network
    here): canon's download leaves an empty file in a torch.hub cache of the test's own, and
    torchvision's builder, which would read it, builds the model without weights."""
    from canon.transfer import torchvision as transfer

    build = transfer.tvm.get_model

    def get_model(name: str, weights: object, **options: object) -> object:
        quick = {"init_weights": False} if name == "googlenet" else {}
        return build(name, weights=None, **options, **quick)

    def download(url: str, destination: Path, **check: str) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.touch()

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(transfer.tvm, "get_model", get_model)
    monkeypatch.setattr(transfer, "download", download)
