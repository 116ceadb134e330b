"""The files of a run on disk: their mode, unwritable and full output folders, temporary files
of killed writes, unreadable checkpoints and exports, and one run per run directory. Every
case uses real files, and real processes where a kill or a lock is involved."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch.utils.serialization import config as serialization

from canon.engine import checkpoint as ckpt
from canon.engine.rundir import (
    anchored_recipe,
    check_continuation,
    claim_run_dir,
)
from canon.engine.trained import load_trained
from canon.errors import DataError
from canon.files import atomic_write, sweep_partial_writes
from canon.models.factory import create_model
from canon.recipes import RECIPE_HEADER, load_recipe

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
CLASS_IDS = [f"n0{index:07d}" for index in range(10)]  # as an ImageNet folder's wnids
HOST = socket.gethostname()  # as a lock file names it


def training_state(epoch: int) -> dict:
    """A complete state as the trainer writes it, for quickstart's ResNet-20."""
    model = create_model("resnet20", 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": {},
        "scaler": {}, "ema": None, "epoch": epoch, "step": 10 * epoch, "step_in_epoch": 0,
        "epoch_totals": [{"loss": 0.0}], "rng": [ckpt.capture_rng_state()], "metrics": [],
        "recipe": load_recipe("quickstart").to_dict(), "commit": None, "model_name": "resnet20",
        "classes": CLASSES, "class_ids": CLASS_IDS, "eval_config": model.eval_config.to_dict(),
        "normalization": {"mean": torch.rand(3, 32, 32), "std": None},
        "torch_version": str(torch.__version__),
    }


def write_run(run_dir: Path) -> dict:
    """Two epoch checkpoints, best.pt, the export and the logs a finished run leaves."""
    for epoch in (1, 2):
        state = training_state(epoch)
        ckpt.save_checkpoint(state, ckpt.epoch_checkpoint(run_dir, epoch))
    ckpt.copy_checkpoint(ckpt.epoch_checkpoint(run_dir, 2), ckpt.best_checkpoint(run_dir))
    model = create_model("resnet20", 10)
    model.load_state_dict(state["model"])
    info = {"model": "resnet20", "num_classes": 10, "classes": CLASSES, "class_ids": CLASS_IDS,
            "data": state["recipe"]["data"]}
    ckpt.export_model(run_dir, model, state["normalization"], info)
    (run_dir / "metrics.csv").write_text("epoch,val_top1_error\n1,80.0\n2,70.0\n")
    (run_dir / "recipe.yaml").write_text(f"{RECIPE_HEADER}canon 0.1.0, commit None\nname: x\n")
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard" / "events.out.tfevents.1").write_bytes(b"events")
    (run_dir / "eval-center.json").write_text("{}")
    return state


def single_line_error(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---- the mode of written files -----------------------------------------------------------


def test_written_files_get_the_mode_open_gives(tmp_path):
    previous = os.umask(0o027)
    try:
        atomic_write(tmp_path / "plain.txt", lambda temporary: temporary.write_text("x"))
        with open(tmp_path / "opened.txt", "w") as f:
            f.write("x")
        write_run(tmp_path / "run")
    finally:
        os.umask(previous)
    assert (tmp_path / "opened.txt").stat().st_mode & 0o777 == 0o640
    written = [tmp_path / "plain.txt", *(tmp_path / "run").rglob("*.pt"),
               *(tmp_path / "run").glob("*.safetensors"), tmp_path / "run" / "eval_config.json"]
    assert {oct(path.stat().st_mode & 0o777) for path in written} == {oct(0o640)}


def test_a_written_file_and_then_its_folder_are_synced_to_disk(tmp_path, monkeypatch):
    # The rename is an entry of the folder: without the folder's fsync a power loss can undo
    # it, leaving the file's old content (a checkpoint an epoch behind its metrics).
    synced = []
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append(stat.S_ISDIR(os.fstat(descriptor).st_mode))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write(tmp_path / "entry.txt", lambda temporary: temporary.write_text("x"))
    assert synced == [False, True] and (tmp_path / "entry.txt").read_text() == "x"


# ---- folders that cannot be written -------------------------------------------------------


def test_a_file_in_place_of_the_output_folder_is_a_one_line_data_error(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    with pytest.raises(DataError) as caught:
        atomic_write(blocker / "cache" / "entry.bin", lambda temporary: temporary.write_text("x"))
    assert single_line_error(caught) == (
        f"cannot write {blocker}/cache/entry.bin: {blocker} is a file, not a folder; "
        "choose a writable folder"
    )
    with pytest.raises(DataError, match=r"epoch-001\.pt: .* is a file, not a folder; choose a "
                                        r"writable --output-dir$") as caught:
        ckpt.save_checkpoint(training_state(1), ckpt.epoch_checkpoint(blocker / "run", 1))
    single_line_error(caught)
    for run_dir in (blocker, blocker / "run"):
        with pytest.raises(DataError) as caught, claim_run_dir(run_dir, resume=False):
            pass
        assert single_line_error(caught) == (
            f"cannot write {run_dir}: {blocker} is a file, not a folder; "
            "choose a writable --output-dir"
        )
    assert blocker.read_text() == "a file, not a folder"


def test_a_folder_without_write_permission_is_a_one_line_data_error(tmp_path):
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
    elif Path("/sys/kernel").is_dir():  # root may write anywhere chmod allows, but not to sysfs
        folder = Path("/sys")
    else:
        pytest.skip("running as root without a sysfs to find a folder root cannot write")
    with pytest.raises(DataError) as caught:
        ckpt.save_checkpoint(training_state(1), folder / "epoch-001.pt")
    assert single_line_error(caught) == (
        f"cannot write {folder}/epoch-001.pt: Permission denied; choose a writable --output-dir"
    )
    with pytest.raises(DataError) as caught, claim_run_dir(folder / "run", resume=False):
        pass
    assert single_line_error(caught) in (  # sysfs refuses folders with EPERM
        f"cannot write {folder}/run: {reason}; choose a writable --output-dir"
        for reason in ("Permission denied", "Operation not permitted")
    )


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import torch
from canon.engine import checkpoint as ckpt
from canon.errors import DataError
from canon.models.factory import create_model

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))  # as if the disk were full
run_dir = Path(sys.argv[1])
for write in (
    lambda: ckpt.save_checkpoint({"model": torch.zeros(100_000)}, run_dir / "epoch-001.pt"),
    lambda: ckpt.export_model(run_dir, create_model("resnet20", 10), None, {}),
):
    try:
        write()
    except DataError as error:
        print(error)
"""


def test_a_full_disk_is_a_data_error_that_leaves_no_temporary_file(tmp_path):
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    advice = "File too large; free some space or choose a writable --output-dir"
    assert result.stdout.splitlines() == [
        f"cannot write {tmp_path}/epoch-001.pt: {advice}",
        f"cannot write {tmp_path}/model.safetensors: {advice}",
    ]
    assert list(tmp_path.iterdir()) == []


# ---- temporary files of writes killed midway ----------------------------------------------


KILLED_WRITE = """
import sys, time
from pathlib import Path
from canon.files import atomic_write

def write_slowly(temporary):
    temporary.write_bytes(b"the first half of a checkpoint")
    print(temporary, flush=True)
    time.sleep(600)

atomic_write(Path(sys.argv[1]), write_slowly)
"""


def kill_mid_write(target: Path) -> Path:
    """Write `target` in another process and SIGKILL it midway; the temporary file it left."""
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, str(target)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    temporary = Path(child.stdout.readline().strip())
    child.kill()
    _, errors = child.communicate(timeout=60)
    assert temporary.parent == target.parent and temporary.is_file(), errors
    return temporary


def test_sweeping_removes_the_files_of_killed_writes_and_nothing_else(tmp_path):
    folder = tmp_path / "checkpoints"
    killed = kill_mid_write(folder / "epoch-002.pt")
    assert killed.name.startswith(".epoch-002.pt.")
    handle, older_canon = tempfile.mkstemp(prefix=".epoch-003.pt.", dir=folder)  # as before
    os.close(handle)
    kept = [folder / name for name in (
        "epoch-001.pt", "notes.txt", ".lock", ".hidden", ".epoch-001.pt.bak", "a.b.abcdefgh",
        ".epoch-001.pt.abcdefghi",
    )]
    for path in kept:
        path.write_bytes(b"keep")
    (folder / ".folder.abcdefgh").mkdir()  # named like one, but a folder
    kept.append(folder / ".folder.abcdefgh")
    assert sweep_partial_writes(folder, targets=("*.safetensors", "notes.txt")) == []
    assert sorted(sweep_partial_writes(folder)) == sorted([killed, Path(older_canon)])
    assert sorted(folder.iterdir()) == sorted(kept)
    assert sweep_partial_writes(tmp_path / "absent") == []


def test_pruning_epoch_checkpoints_sweeps_killed_writes(tmp_path):
    for epoch in (1, 2, 3):
        ckpt.save_checkpoint(training_state(epoch), ckpt.epoch_checkpoint(tmp_path, epoch))
    killed = kill_mid_write(ckpt.epoch_checkpoint(tmp_path, 4))
    ckpt.prune_epoch_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "epoch-002.pt", "epoch-003.pt"
    ]
    assert not killed.exists()


# ---- resuming -----------------------------------------------------------------------------


def test_a_kill_during_the_first_checkpoint_says_to_start_again(tmp_path):
    with pytest.raises(DataError) as caught:
        ckpt.load_for_resume(tmp_path)
    assert single_line_error(caught) == (
        f"{tmp_path} holds no run (no recipe.yaml, no checkpoints); resume from a run "
        "directory or a checkpoint file")
    (tmp_path / "recipe.yaml").write_text(f"{RECIPE_HEADER}canon\nname: quickstart\n")  # first
    kill_mid_write(ckpt.epoch_checkpoint(tmp_path, 1))
    with pytest.raises(DataError) as caught:
        ckpt.load_for_resume(tmp_path)
    assert single_line_error(caught) == (
        f"no checkpoint to resume from in {tmp_path}/checkpoints: the run has not finished its "
        "first epoch (it may still be running) or stopped before; if it stopped, start it "
        "again without --resume"
    )
    with claim_run_dir(tmp_path, resume=False):  # ... and starting again is allowed
        assert [p.name for p in tmp_path.iterdir()] == [".lock"]


def test_resuming_from_a_path_that_does_not_exist_is_one_error_and_no_warning(tmp_path):
    missing = tmp_path / "runs" / "does-not-exist"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError) as caught:
            ckpt.load_for_resume(missing)
    assert single_line_error(caught) == (
        f"{missing} does not exist; resume from a run directory or a checkpoint file"
    )


def random_files(count: int) -> list[bytes]:
    """Random bytes of many lengths; some start like a zip archive or a pickle, to get past
    the first checks of torch.load."""
    rng = random.Random(2012)
    contents = []
    for index in range(count):
        length = rng.choice([0, 1, 2, 7, 8, 30, 64, 100, 512, 1000, 4096, 40_000])
        content = rng.randbytes(length)
        start = (b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95")[index % 4]
        contents.append(start + content[len(start):] if length > len(start) else content)
    return contents


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")  # torch, on noise
def test_every_unreadable_checkpoint_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "epoch-001.pt"
    for content in random_files(200):
        path.write_bytes(content)
        with pytest.raises(DataError) as caught:
            ckpt.load_checkpoint(path)
        assert str(path) in single_line_error(caught)
    ckpt.save_checkpoint(training_state(1), path)
    whole = path.read_bytes()
    for size in (10, len(whole) // 3, len(whole) // 2, len(whole) - 100):
        path.write_bytes(whole[:size])
        with pytest.raises(DataError, match=r"epoch-001\.pt is unreadable") as caught:
            ckpt.load_checkpoint(path)
        single_line_error(caught)
    torch.save({"model": {}, "recipe": {}}, path)  # readable, but not the trainer's state
    with pytest.raises(DataError, match=r"epoch-001\.pt has no valid 'optimizer' \(dict "):
        ckpt.load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(DataError, match="not a canon training checkpoint"):
        ckpt.load_checkpoint(path)
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)  # weights alone, as users save them
    with pytest.raises(DataError, match=r"holds a bare state_dict .*name torchvision:NAME"):
        ckpt.load_checkpoint(path)
    path.write_text("epoch,val_top1_error\n1,80.0\n")  # another file of the run, named
    with pytest.raises(DataError, match=r"epoch-001\.pt is not a checkpoint"):
        ckpt.load_checkpoint(path)
    in_a_run = ckpt.epoch_checkpoint(tmp_path / "run", 1)  # RUN/checkpoints/epoch-001.pt
    in_a_run.parent.mkdir(parents=True)
    in_a_run.write_bytes(whole[:100])
    with pytest.raises(DataError, match=f"given the run folder {tmp_path / 'run'} instead, "
                       "canon passes over unreadable ones"):
        ckpt.load_checkpoint(in_a_run)


def _flip_a_weight_byte(checkpoint: Path) -> str:
    """One byte of the largest record (a weight) of `checkpoint` changed; the record's name."""
    with zipfile.ZipFile(checkpoint) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    whole = bytearray(checkpoint.read_bytes())
    local = record.header_offset  # the record's header: 30 bytes, its name, its extra field
    name_size, extra_size = int.from_bytes(whole[local + 26 : local + 28], "little"), \
        int.from_bytes(whole[local + 28 : local + 30], "little")
    whole[local + 30 + name_size + extra_size + 5] ^= 0x40
    checkpoint.write_bytes(bytes(whole))
    return record.filename


def test_a_checkpoint_whose_bytes_changed_is_damaged_not_loaded(tmp_path):
    """A flipped byte in a weight's record still unpickles (torch.load checks no CRC): the
    archive's checksums catch it, for the counters read alone too, and resume goes on from
    the last good checkpoint, also where the damaged one is named. A checkpoint saved without
    CRCs (torch's compute_crc32 off) loads."""
    write_run(tmp_path)
    newest = ckpt.epoch_checkpoint(tmp_path, 2)
    record = _flip_a_weight_byte(newest)
    for mmap in (False, True):
        with pytest.raises(DataError, match=rf"epoch-002\.pt is damaged: its record {record} "
                           r"no longer matches the checksum .*given the run folder") as caught:
            ckpt.load_checkpoint(newest, mmap=mmap)
        single_line_error(caught)
    with pytest.warns(ckpt.CheckpointWarning, match=r"epoch-002\.pt is damaged"):
        assert ckpt.load_for_resume(tmp_path)[0] == ckpt.epoch_checkpoint(tmp_path, 1)
    stopped = ckpt.interrupted_checkpoint(tmp_path)
    ckpt.copy_checkpoint(newest, stopped)
    with pytest.warns(ckpt.CheckpointWarning, match=r"interrupted\.pt is damaged"):
        loaded, state = ckpt.load_for_resume(stopped)
    check_continuation(loaded, state, True, tmp_path)  # the newest readable: goes on in place
    with serialization.patch({"save.compute_crc32": False}):
        ckpt.save_checkpoint(training_state(3), newest)
    assert ckpt.load_checkpoint(newest)["epoch"] == 3


def test_a_damaged_newest_checkpoint_named_goes_on_from_the_last_good_one_in_place(tmp_path):
    """--resume RUN/checkpoints/interrupted.pt, damaged: load_for_resume falls back to
    epoch-002.pt, the newest readable state, which goes on in its own folder (it was refused
    as "older than interrupted.pt"); a readable newer checkpoint still refuses an older one."""
    write_run(tmp_path)
    interrupted = ckpt.interrupted_checkpoint(tmp_path)
    interrupted.write_bytes(b"cut short")
    with pytest.warns(ckpt.CheckpointWarning, match="interrupted.pt"):
        loaded, state = ckpt.load_for_resume(interrupted)
    assert loaded == ckpt.epoch_checkpoint(tmp_path, 2)
    check_continuation(loaded, state, True, tmp_path)
    first = ckpt.epoch_checkpoint(tmp_path, 1)
    with pytest.raises(DataError, match=r"epoch-001\.pt is older than .*epoch-002\.pt"):
        check_continuation(first, ckpt.load_checkpoint(first), True, tmp_path)


def test_resume_passes_over_unreadable_checkpoints_to_the_last_good_one(tmp_path):
    write_run(tmp_path)
    ckpt.epoch_checkpoint(tmp_path, 2).write_bytes(random_files(12)[11])
    torch.save({"model": {}, "recipe": {}, "epoch": 2}, ckpt.interrupted_checkpoint(tmp_path))
    with pytest.warns(ckpt.CheckpointWarning) as caught:
        path, state = ckpt.load_for_resume(tmp_path)
    assert path == ckpt.epoch_checkpoint(tmp_path, 1) and state["epoch"] == 1
    assert [str(warning.message).split(" ")[0] for warning in caught] == [
        str(ckpt.interrupted_checkpoint(tmp_path)), str(ckpt.epoch_checkpoint(tmp_path, 2))
    ]
    # a truncated one: no advice to give the run folder, which was given
    epoch_2 = ckpt.epoch_checkpoint(tmp_path, 2)
    epoch_2.write_bytes(ckpt.epoch_checkpoint(tmp_path, 1).read_bytes()[:2000])
    with pytest.warns(ckpt.CheckpointWarning) as caught:
        ckpt.load_for_resume(tmp_path)
    damaged = [str(warning.message) for warning in caught if str(epoch_2) in str(warning.message)]
    assert damaged and "truncated" in damaged[0] and "given the run folder" not in damaged[0]
    # a file named goes back to older ones only, never to the run's newer (readable) ones
    shutil.copy(ckpt.epoch_checkpoint(tmp_path, 1), ckpt.interrupted_checkpoint(tmp_path))
    with pytest.warns(ckpt.CheckpointWarning, match="epoch-002.pt"):
        assert ckpt.load_for_resume(ckpt.epoch_checkpoint(tmp_path, 2))[0] == \
            ckpt.epoch_checkpoint(tmp_path, 1)
    # the file named and nothing older: its own error, without "trying an older checkpoint"
    ckpt.epoch_checkpoint(tmp_path, 1).write_bytes(b"cut")
    for named, reason in ((ckpt.epoch_checkpoint(tmp_path, 1), ""),
                          (tmp_path / "metrics.csv", " is not a checkpoint")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(DataError, match=rf"^{named}{reason}"):
                ckpt.load_for_resume(named)
    # every one damaged: said, with what to do
    ckpt.interrupted_checkpoint(tmp_path).write_bytes(b"cut")
    with pytest.warns(ckpt.CheckpointWarning), pytest.raises(DataError) as caught:
        ckpt.load_for_resume(tmp_path)
    assert single_line_error(caught).endswith(
        ". Nothing of the run can be resumed: start it again (canon train --overwrite replaces it)")
    # a user's copy beside them is not an epoch checkpoint (it crashed the listing)
    (tmp_path / "checkpoints" / "epoch-002-backup.pt").write_bytes(b"mine")
    assert [p.name for p in ckpt.resumable_checkpoints(tmp_path)] == [
        "interrupted.pt", "epoch-002.pt", "epoch-001.pt"]


# ---- trained models from exports and checkpoints ------------------------------------------


def test_a_trained_model_carries_its_class_ids(tmp_path):
    state = write_run(tmp_path)
    for source in (tmp_path, tmp_path / "model.safetensors", ckpt.best_checkpoint(tmp_path)):
        trained = load_trained(source)
        assert trained.classes == CLASSES and trained.class_ids == CLASS_IDS
    assert load_trained(tmp_path).source == tmp_path / "model.safetensors"
    # Runs from before class_ids was saved: the class names stand in.
    info = json.loads((tmp_path / "eval_config.json").read_text())
    del info["class_ids"]
    (tmp_path / "eval_config.json").write_text(json.dumps(info))
    del state["class_ids"]
    ckpt.save_checkpoint(state, ckpt.best_checkpoint(tmp_path))
    for source in (tmp_path, ckpt.best_checkpoint(tmp_path)):
        assert load_trained(source).class_ids == CLASSES


def edit_config(change):
    def edit(run_dir: Path) -> None:
        path = run_dir / "eval_config.json"
        path.write_text(change(json.loads(path.read_text())))
    return edit


def truncate(name: str):
    def cut(run_dir: Path) -> None:
        path = run_dir / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cut


def without(key: str):
    return edit_config(lambda info: json.dumps({k: v for k, v in info.items() if k != key}))


def replace_weights(change, *, export_id: str | None = None):
    """model.safetensors rewritten with change(its tensors), as the same export (its id kept),
    or with `export_id`, another export's."""
    def rewrite(run_dir: Path) -> None:
        path = run_dir / "model.safetensors"
        with safetensors.safe_open(path, "pt") as file:
            metadata = file.metadata() if export_id is None else {"canon_export": export_id}
        safetensors.torch.save_file(change(safetensors.torch.load_file(path)), path,
                                    metadata=metadata)
    return rewrite


BAD_EXPORTS = {  # a damage, and what the error must name
    "truncated weights": (truncate("model.safetensors"), r"model\.safetensors is unreadable"),
    "random weights": (
        lambda run_dir: (run_dir / "model.safetensors").write_bytes(random.randbytes(3000)),
        r"model\.safetensors is unreadable",
    ),
    "truncated normalization": (
        truncate("normalization.safetensors"), r"normalization\.safetensors is unreadable"
    ),
    "missing normalization": (  # not a silent fall back to the model's default mean
        lambda run_dir: (run_dir / "normalization.safetensors").unlink(),
        r"normalization\.safetensors is missing: the model's inputs were normalised",
    ),
    "config not JSON": (
        edit_config(lambda info: json.dumps(info)[:-20]), r"eval_config\.json is unreadable"
    ),
    "config a list": (
        edit_config(lambda info: json.dumps(list(info))),
        r"eval_config\.json holds a JSON list, not the object canon train writes",
    ),
    "no num_classes": (without("num_classes"), r"eval_config\.json has no valid 'num_classes'"),
    "no model": (without("model"), r"eval_config\.json has no valid 'model'"),
    "no classes": (without("classes"), r"eval_config\.json has no valid 'classes'"),
    "data of another canon": (  # a key this canon does not know: the file is named
        edit_config(lambda info: json.dumps({**info, "data": {**info["data"], "new": 1}})),
        r"model\.safetensors: its data section: unknown data key\(s\) \['new'\].* \(written "
        r"by another version of canon\?\)",
    ),
    "a class name too few": (  # predict printed misaligned names, or failed with IndexError
        edit_config(lambda info: json.dumps({**info, "classes": info["classes"][:-1]})),
        r"model\.safetensors: 9 class names and 10 class ids for a model of 10 outputs",
    ),
    "weights gone NaN": (  # bytes damaged in place: the file still reads
        replace_weights(lambda tensors: {
            key: value.fill_(float("nan")) if key == "fc.weight" else value
            for key, value in tensors.items()}),
        r"model\.safetensors: its weight fc\.weight holds NaN or infinite values",
    ),
    "weights of another model": (
        replace_weights(lambda _: {"fc.weight": torch.zeros(2, 2)}),
        r"model\.safetensors: its weights do not fit resnet20 with 10 classes \(RuntimeError: "
        r"Error\(s\) in loading state_dict for CifarResNet: Missing key\(s\) in state_dict: ",
    ),
    "an older config": (  # an eval_config.json from before the id, beside new weights
        without("canon_export"), r"\.safetensors was not exported with .*eval_config\.json"),
    "another export's weights": (  # renamed or copied in: not read with this run's classes
        replace_weights(lambda tensors: tensors, export_id="0" * 32),
        r"model\.safetensors was not exported with .*eval_config\.json \(another export's",
    ),
}


@pytest.mark.parametrize("damage", BAD_EXPORTS, ids=list(BAD_EXPORTS))
def test_a_bad_export_is_a_data_error_and_a_run_falls_back_to_its_checkpoint(tmp_path, damage):
    random.seed(damage)
    write_run(tmp_path)
    corrupt, named = BAD_EXPORTS[damage]
    corrupt(tmp_path)
    with pytest.raises(DataError, match=named) as caught:
        load_trained(tmp_path / "model.safetensors")
    single_line_error(caught)
    with pytest.warns(ckpt.CheckpointWarning, match=named + ".*; using .*best.pt instead"):
        trained = load_trained(tmp_path)
    assert trained.source == ckpt.best_checkpoint(tmp_path) and trained.class_ids == CLASS_IDS
    ckpt.best_checkpoint(tmp_path).unlink()  # as in a run that validated on the test set
    with pytest.warns(ckpt.CheckpointWarning, match=named + ".*; using .*epoch-002.pt instead"):
        assert load_trained(tmp_path).source == ckpt.epoch_checkpoint(tmp_path, 2)
    for epoch in (1, 2):
        ckpt.epoch_checkpoint(tmp_path, epoch).unlink()
    with pytest.raises(DataError, match=named):  # nothing to fall back to
        load_trained(tmp_path)


def test_weights_rewritten_without_an_export_id_are_read_with_a_warning(tmp_path):
    """A tool that drops safetensors metadata (an fp16 copy, pruning) leaves no id to compare:
    the file is read with the eval_config.json beside it, and said so."""
    write_run(tmp_path)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(path), path)
    with pytest.warns(UserWarning, match=r"model\.safetensors carries no export id"):
        assert load_trained(path).class_ids == CLASS_IDS


def test_a_run_without_an_export_falls_back_from_an_unreadable_best_to_its_last_epoch(
    tmp_path
):
    write_run(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    truncate("checkpoints/best.pt")(tmp_path)
    with pytest.warns(ckpt.CheckpointWarning,
                      match=r"best\.pt is unreadable.*; using .*epoch-002\.pt instead"):
        assert load_trained(tmp_path).source == ckpt.epoch_checkpoint(tmp_path, 2)


# ---- one run per run directory -------------------------------------------------------------


def test_a_run_records_its_relative_paths_whole(tmp_path, monkeypatch):
    """The data folder, model.init_from and data.normalization_from as the absolute paths
    they name, so that a resume from another directory finds them; names and paths that do
    not exist stay as they are."""
    for name in ("data", "source"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    recipe = anchored_recipe(load_recipe("quickstart", [
        ("data.dataset", "data"), ("model.init_from", "source"),
        ("data.normalization_from", "source")]))
    assert (recipe.data.dataset, recipe.model.init_from, recipe.data.normalization_from) == (
        str(tmp_path / "data"), str(tmp_path / "source"), str(tmp_path / "source"))
    named = anchored_recipe(load_recipe("quickstart", [("model.init_from", "torchvision:alexnet")]))
    assert (named.data.dataset, named.model.init_from) == ("sample", "torchvision:alexnet")


def test_a_new_run_refuses_a_directory_holding_another_run(tmp_path):
    write_run(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(DataError) as caught, claim_run_dir(tmp_path, resume=False):
        pass
    assert single_line_error(caught) == (
        f"{tmp_path} already holds a run; pass --overwrite (overwrite=True in Python) to "
        f"replace it, or pick another output folder (a training run continues with --resume "
        f"{tmp_path}, resume= in Python)"
    )
    assert sorted(tmp_path.rglob("*")) == before
    with claim_run_dir(tmp_path, resume=True):  # continuing it keeps everything
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}@{HOST} canon run\n"
    assert sorted(tmp_path.rglob("*")) == before


def test_overwrite_deletes_the_earlier_run_s_files_only(tmp_path):
    """Set aside while the new run has no checkpoint, deleted when it ends well, put back
    when it fails first."""
    write_run(tmp_path)
    (tmp_path / "visualize" / "filters").mkdir(parents=True)  # pictures of the run's model
    (tmp_path / "visualize" / "filters" / "filters.png").write_bytes(b"png")
    for report in ("eval-center-per-class.csv", "eval-center-confusion.png"):  # --per-class
        (tmp_path / report).write_bytes(b"report")
    (tmp_path / "earlier-reports" / "epoch-1").mkdir(parents=True)  # before a resume trained on
    (tmp_path / "earlier-reports" / "epoch-1" / "eval-center.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    earlier = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt), claim_run_dir(tmp_path, resume=False, overwrite=True):
        (tmp_path / "recipe.yaml").write_text("the new run's\n")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == earlier
    assert (tmp_path / "recipe.yaml").read_text() != "the new run's\n"
    # A new run killed (SIGKILL) before its first checkpoint: the next claim puts it back.
    aside = tmp_path / ".replaced-run"
    aside.mkdir()
    for name in sorted(set(earlier) - {"data", "notes.txt"}):
        (tmp_path / name).rename(aside / name)
    (tmp_path / "recipe.yaml").write_text(f"{RECIPE_HEADER}canon 0.1.0, commit None\nname: y\n")
    # Until then, what finds no checkpoint here says where the earlier run is.
    with pytest.raises(DataError, match=r"no checkpoint to resume from .*replaced-run until"):
        ckpt.load_for_resume(tmp_path)
    with pytest.raises(DataError, match=r"holds no trained model .*replaced-run until the new"):
        load_trained(tmp_path)
    stopped = tmp_path / "stopped" / "checkpoints"  # Ctrl-C in the first epoch
    stopped.mkdir(parents=True)
    (stopped / "interrupted.pt").write_bytes(b"a state, not a model")
    with pytest.raises(DataError, match=r"stopped in its first epoch: `canon train --resume "
                       r".*stopped` goes on, or name .*interrupted\.pt itself"):
        load_trained(stopped.parent)
    shutil.rmtree(stopped.parent)
    with (pytest.raises(DataError, match="already holds a run; pass --overwrite"),
          claim_run_dir(tmp_path, resume=False)):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == earlier
    with claim_run_dir(tmp_path, resume=False, overwrite=True):
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            ".lock", ".replaced-run", "data", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]


def test_a_replacement_stopped_in_its_first_epoch_keeps_the_earlier_run_aside(tmp_path):
    """--overwrite, then Ctrl-C before the new run's first epoch ended: its interrupted.pt
    stays, to resume, and so does the earlier run, aside, until the new run has an epoch
    checkpoint; an --overwrite over the stopped run replaces that one, not the earlier."""
    write_run(tmp_path)
    aside = tmp_path / ".replaced-run"
    stopped = ckpt.interrupted_checkpoint(tmp_path)
    for attempt in range(2):  # a stop, then a resume stopped again
        with (pytest.raises(KeyboardInterrupt),
              claim_run_dir(tmp_path, resume=attempt > 0, overwrite=attempt == 0)):
            ckpt.save_checkpoint(training_state(1), stopped)
            raise KeyboardInterrupt
        assert stopped.is_file() and (aside / "checkpoints" / "epoch-002.pt").is_file()
    with (pytest.raises(DataError, match=r"already holds a run.*replaced-run until the new"),
          claim_run_dir(tmp_path, resume=False)):
        pass
    with claim_run_dir(tmp_path, resume=False, overwrite=True):  # the stopped run goes
        assert not stopped.exists() and (aside / "checkpoints" / "epoch-002.pt").is_file()
    assert not aside.exists()  # that run ended well
    # A replacement that finished an epoch before the stop: the earlier run goes for good.
    second = tmp_path / "second"
    write_run(second)
    with pytest.raises(KeyboardInterrupt), claim_run_dir(second, resume=False, overwrite=True):
        ckpt.save_checkpoint(training_state(1), ckpt.epoch_checkpoint(second, 1))
        ckpt.save_checkpoint(training_state(1), ckpt.interrupted_checkpoint(second))
        raise KeyboardInterrupt
    assert not (second / ".replaced-run").exists()


def test_a_failed_replacement_gives_back_an_earlier_run_s_lone_best_checkpoint(tmp_path):
    """An earlier run whose epoch checkpoints were deleted, best.pt and the export kept: a new
    run over it that fails before its first checkpoint puts all of it back, best.pt too."""
    write_run(tmp_path)
    for epoch in (1, 2):
        ckpt.epoch_checkpoint(tmp_path, epoch).unlink()
    earlier = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*")
               if p.is_file()}
    with pytest.raises(ValueError), claim_run_dir(tmp_path, resume=False, overwrite=True):
        (tmp_path / "recipe.yaml").write_text("the new run's\n")
        raise ValueError("a loss that went to NaN")
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*")
            if p.is_file()} == earlier
    with pytest.raises(DataError, match=r"keeps only best.pt .*--resume .*best.pt"):
        ckpt.load_for_resume(tmp_path)


def test_a_carried_best_checkpoint_is_not_the_new_run_s_first(tmp_path):
    """A run continued here from another folder copies that run's best.pt before its first
    epoch (keep_best): failing in that epoch puts the replaced run back, or in a folder of its
    own leaves nothing that refuses a new start without --overwrite."""
    write_run(tmp_path)
    earlier = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(KeyboardInterrupt), claim_run_dir(tmp_path, resume=False, overwrite=True):
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "best.pt").write_bytes(b"the continued run's best")
        raise KeyboardInterrupt
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == earlier
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt), claim_run_dir(fresh, resume=False):
        (fresh / "checkpoints").mkdir()
        (fresh / "checkpoints" / "best.pt").write_bytes(b"the continued run's best")
        raise KeyboardInterrupt
    with claim_run_dir(fresh, resume=False):  # nothing of its own to resume: started anew
        assert not (fresh / "checkpoints").exists()
    # best.pt that no failed continuation left, but a user kept: a run's, not replaced unasked
    kept = tmp_path / "kept"
    (kept / "checkpoints").mkdir(parents=True)
    ckpt.copy_checkpoint(ckpt.epoch_checkpoint(tmp_path, 2), ckpt.best_checkpoint(kept))
    with pytest.raises(DataError, match="already holds a run"), claim_run_dir(kept, resume=False):
        pass


def test_new_runs_start_in_empty_unrelated_or_result_less_directories(tmp_path):
    with claim_run_dir(tmp_path / "new" / "run", resume=False):  # created, parents too
        assert (tmp_path / "new" / "run").is_dir()
    mine = tmp_path / "mine"
    (mine / "visualize").mkdir(parents=True)  # canon visualize's of other models, run here
    for name in ("notes.txt", ".config.settings"):  # the latter named like a temporary file
        (mine / name).write_text("mine")
    killed = [kill_mid_write(mine / name) for name in ("model.safetensors", "metrics.csv")]
    with claim_run_dir(mine, resume=False):
        pass
    assert sorted(p.name for p in mine.iterdir()) == [".config.settings", "notes.txt",
                                                      "visualize"]
    assert not any(path.exists() for path in killed)
    # A run that stopped before its first checkpoint: nothing to resume, so it is replaced.
    stopped = tmp_path / "stopped"
    (stopped / "tensorboard").mkdir(parents=True)
    (stopped / "recipe.yaml").write_text(f"{RECIPE_HEADER}canon 0.1.0, commit None\nname: x\n")
    killed = kill_mid_write(ckpt.epoch_checkpoint(stopped, 1))
    with claim_run_dir(stopped, resume=False):
        assert sorted(p.name for p in stopped.iterdir()) == [".lock"]
    assert not killed.exists()
    # A recipe.yaml no run wrote is the user's: kept, even under --overwrite.
    (mine / "recipe.yaml").write_text("# my experiment\nbase: quickstart\n")
    for overwrite in (False, True):
        with (pytest.raises(DataError, match=r"recipe\.yaml is not a recipe a run wrote"),
              claim_run_dir(mine, resume=False, overwrite=overwrite)):
            pass
    assert (mine / "recipe.yaml").read_text() == "# my experiment\nbase: quickstart\n"


def test_the_lock_is_freed_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError, match="training failed"), claim_run_dir(tmp_path,
                                                                                resume=False):
        raise RuntimeError("training failed")
    with claim_run_dir(tmp_path, resume=True):
        pass


def test_a_failed_run_removes_the_empty_directory_it_created_and_nothing_else(tmp_path):
    created = tmp_path / "runs" / "transfer-linear-probe"
    with pytest.raises(DataError, match="no images"), claim_run_dir(created, resume=False):
        raise DataError("no images")
    assert not created.exists() and (tmp_path / "runs").is_dir()
    with pytest.raises(DataError), claim_run_dir(created, resume=False):
        (created / "features").mkdir()  # it wrote something: kept, for the user to look at
        raise DataError("no images")
    assert sorted(p.name for p in created.iterdir()) == ["features"]
    given = tmp_path / "given"
    given.mkdir()
    with pytest.raises(DataError), claim_run_dir(given, resume=False):
        raise DataError("no images")
    assert given.is_dir()  # the user made it


HOLD_RUN_DIR = """
import sys, time
from pathlib import Path
from canon.engine.rundir import claim_run_dir
from canon.errors import DataError

try:
    with claim_run_dir(Path(sys.argv[1]), resume=True):
        print("claimed", flush=True)
        time.sleep(600)
except DataError as error:
    print(error, flush=True)
"""


def claim_in_child(run_dir: Path) -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen([sys.executable, "-c", HOLD_RUN_DIR, str(run_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return child, child.stdout.readline().strip()


def test_a_second_run_on_the_same_directory_fails_at_once(tmp_path):
    with claim_run_dir(tmp_path, resume=False):
        child, said = claim_in_child(tmp_path)
        assert child.wait(timeout=60) == 0, child.stderr.read()
    assert said == (
        f"{tmp_path} is in use by another canon run (pid {os.getpid()}); wait for it or use "
        "another --output-dir"
    )


def test_resuming_a_run_still_in_its_first_epoch_says_it_is_in_use(tmp_path):
    """Not that it may have stopped: the lock says it is running."""
    with claim_run_dir(tmp_path, resume=False):
        (tmp_path / "recipe.yaml").write_text(f"{RECIPE_HEADER}canon 0.1.0, commit None\n")
        with pytest.raises(DataError, match=rf"{tmp_path} is in use by another canon run \(pid "
                           rf"{os.getpid()}\), which has not finished its first epoch"):
            ckpt.load_for_resume(tmp_path)
    with pytest.raises(DataError, match="no checkpoint to resume from"):
        ckpt.load_for_resume(tmp_path)


def test_a_run_starting_while_its_folder_is_probed_waits_the_probe_out(tmp_path):
    """folder_holder's probe holds a shared lock for an instant: a claim then is not refused."""
    (tmp_path / ".lock").write_text("")
    probe = os.open(tmp_path / ".lock", os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)
    threading.Timer(0.02, os.close, (probe,)).start()  # a probe far slower than a real one
    with claim_run_dir(tmp_path, resume=False):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}@{HOST} canon run\n"


def _claim_refused_while_locked(run_dir: Path, held: str, refusal: str) -> None:
    """claim_run_dir refused with `refusal` (a pattern) while this process holds
    run_dir/.lock, the file reading `held`, as another process's lock would."""
    (run_dir / ".lock").write_text(held)
    descriptor = os.open(run_dir / ".lock", os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        with pytest.raises(DataError, match=refusal), claim_run_dir(run_dir, resume=True):
            pass
    finally:
        os.close(descriptor)


def test_a_lock_held_by_an_earlier_canon_names_its_pid(tmp_path):
    """Before lock files named their holder, they held its pid alone."""
    _claim_refused_while_locked(
        tmp_path, f"{os.getpid()}\n", f"{tmp_path} is in use by another canon process "
                                       rf"\(pid {os.getpid()}\); wait for it or use")


def test_a_lock_held_on_another_machine_names_it_with_the_pid(tmp_path):
    """On a shared file system the holder may run elsewhere: its pid is not looked up here."""
    _claim_refused_while_locked(
        tmp_path, "999999999@node-7 canon run\n",
        rf"{tmp_path} is in use by another canon run \(pid 999999999 on node-7\)")
    _claim_refused_while_locked(  # being written
        tmp_path, "999999999@node-7 can", rf"{tmp_path} is in use by another canon process "
                                          r"\(pid unknown\)")


def test_a_lock_not_yet_written_does_not_name_its_killed_holder(tmp_path):
    """A new holder locks the file a killed one left, then writes its own pid: read between
    the two, the file names a process that is gone, which the refusal does not repeat."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    _claim_refused_while_locked(
        tmp_path, f"{gone} canon pack\n", f"{tmp_path} is in use by another canon process "
                                           r"\(pid unknown\); wait for it")


def test_a_file_system_without_locks_is_a_data_error_leaving_nothing(tmp_path, monkeypatch):
    def no_locks(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    opened = len(os.listdir("/proc/self/fd"))
    with pytest.raises(DataError, match=r"cannot lock .*run/\.lock: No locks available \(a file "
                       r"system without locks.*use another --output-dir on a local disk"), \
            claim_run_dir(tmp_path / "run", resume=False):
        pass
    assert not (tmp_path / "run").exists() and len(os.listdir("/proc/self/fd")) == opened


def test_a_killed_run_does_not_block_the_next(tmp_path):
    child, said = claim_in_child(tmp_path)
    assert said == "claimed", child.stderr.read()
    with pytest.raises(DataError, match=f"in use by another canon run \\(pid {child.pid}\\)"), \
            claim_run_dir(tmp_path, resume=True):
        pass
    child.kill()
    child.wait(timeout=60)
    # left by the kill:
    assert (tmp_path / ".lock").read_text() == f"{child.pid}@{HOST} canon run\n"
    with claim_run_dir(tmp_path, resume=True):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}@{HOST} canon run\n"
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("name, options", [("googlenet", {"aux_logits": False}),
                                           ("resnet18", {"shortcut": "A"})])
def test_a_checkpoint_rebuilds_a_model_given_with_other_options(name, options, tmp_path):
    """A GoogLeNet without auxiliary heads, a ResNet with option A shortcuts, given to
    canon.train: its checkpoints load back into the same architecture, as its export does."""
    from canon.engine.trainer import train

    recipe = load_recipe("quickstart", [f"model.name={name}", "train.iterations=1",
                                        "train.batch_size=16", "data.val_split=16"])
    model = create_model(name, 10, **options)
    train(recipe, tmp_path, model=model, device="cpu", progress=False)
    for source in (tmp_path, ckpt.epoch_checkpoint(tmp_path, 1)):
        loaded = load_trained(source).model
        assert loaded.build_options() == options, source
        weights = model.state_dict()
        assert all(torch.equal(value, weights[key])
                   for key, value in loaded.state_dict().items()), source


def test_a_resume_that_sees_fewer_gpus_restores_the_ones_it_has(monkeypatch):
    """A run saved on 4 GPUs and resumed under CUDA_VISIBLE_DEVICES=2: torch's
    set_rng_state_all would index past the visible devices."""
    state = ckpt.capture_rng_state()
    state["cuda"] = [torch.full((16,), float(i)).to(torch.uint8) for i in range(4)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda new_state, device: restored.append((int(new_state[0]), device)))
    ckpt.restore_rng_state(state)
    assert restored == [(0, 0)]


def test_metrics_csv_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A finished run's metrics.csv is not written again: a kill while it is rewritten must
    leave the last epoch's whole."""
    import csv

    from canon.engine.logs import write_metrics_csv

    path = tmp_path / "metrics.csv"
    write_metrics_csv(path, [{"epoch": 1, "train_loss": 2.5}])
    before = path.read_text()

    def killed(self, rows):  # after the header
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        write_metrics_csv(path, [{"epoch": 1, "train_loss": 2.5}, {"epoch": 2, "train_loss": 2.0}])
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
