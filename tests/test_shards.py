"""Sharded data (canon.data.packing, canon.data.shards, `canon pack`): the 1,500 real Imagenette
JPEGs packed once into several shards per split, then read back as canon's folder reader reads
them, in every order the training and evaluation streams promise."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shlex
import shutil
import subprocess
import sys
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from canon.cli import main
from canon.data import DataConfig, packing
from canon.data.datasets import open_dataset, validates_on_test_split
from canon.data.folders import BadImageWarning, open_image_folder
from canon.data.loaders import build_loader, collate
from canon.data.pack_command import add_pack_parser, parse_size
from canon.data.packing import _even_bounds, pack_folder
from canon.data.shard_index import OFFSET_EVERY, is_shard_folder, read_index
from canon.data.shards import ShardImages
from canon.engine.rundir import claim_run_dir
from canon.errors import ConfigError, DataError

SHARD_BYTES = 1_500_000  # 7 training and 4 validation shards


def digest(image: torch.Tensor) -> str:
    """A transform naming an image by its pixels, so that tests can follow each sample."""
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def folders(imagenette_root):
    return dict(zip(("train", "val"), open_image_folder(imagenette_root), strict=True))


@pytest.fixture(scope="module")
def packed(imagenette_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "imagenette"
    pack_folder(imagenette_root, out, shard_bytes=SHARD_BYTES, progress=False)
    return out


@pytest.fixture(scope="module")
def train_digests(folders) -> list[str]:
    train = folders["train"].with_transform(digest)
    digests = [train[i][0] for i in range(len(train))]
    assert len(set(digests)) == len(digests)  # every image tells itself apart
    return digests


@pytest.fixture(scope="module")
def val_digests(folders) -> list[str]:
    val = folders["val"]
    return [digest(val.load_image(i)) for i in range(len(val))]


def stream(images: ShardImages, epoch: int = 0, start: int = 0) -> list[tuple[str, int]]:
    images.set_epoch(epoch, start)
    return [(name, int(label)) for names, labels in DataLoader(
        images, batch_size=images.batch_size, num_workers=images.workers, collate_fn=collate
    ) for name, label in zip(names, labels, strict=True)]


def test_the_index_lists_what_the_folder_reader_finds(packed, folders, imagenette_root):
    index = read_index(packed)
    assert is_shard_folder(packed) and not is_shard_folder(imagenette_root)
    assert index.class_ids == folders["train"].class_ids
    assert index.classes == folders["train"].classes
    assert index.source == str(imagenette_root.resolve())
    for name, folder in folders.items():
        split = index.splits[name]
        assert split.samples == len(folder)
        assert split.class_counts == [folder.labels.count(c) for c in range(10)]
        assert split.fingerprint == folder.fingerprint() and split.skipped == 0
        assert [s.file for s in split.shards] == [f"{name}-{i:06d}.tar"
                                                 for i in range(len(split.shards))]
        assert len(split.shards) >= 4
        counts = [shard.samples for shard in split.shards]
        assert max(counts) - min(counts) <= 1  # no small last shard to cut the stream short
        for shard in split.shards:
            assert (packed / shard.file).stat().st_size == shard.bytes <= SHARD_BYTES
            assert sum(shard.class_counts) == shard.samples
            assert len(shard.offsets) == -(-shard.samples // OFFSET_EVERY)
            with tarfile.open(packed / shard.file) as tar:
                members = tar.getmembers()
            for k, offset in enumerate(shard.offsets):  # where sample k x OFFSET_EVERY begins
                assert members[2 * k * OFFSET_EVERY].offset == offset
    assert sorted(p.name for p in packed.iterdir() if not p.name.endswith(".tar")) == [
        "index.json"]


def test_offsets_are_where_samples_begin_when_a_file_grew_after_the_scan(
    imagenette_root, tmp_path, monkeypatch
):
    """A file written to while it is packed (an rsync still running): the offsets are where
    its shard's samples begin as written, not where the scanned sizes put them."""
    root = tmp_path / "data" / "train" / "n01440764"
    root.mkdir(parents=True)
    for path in sorted((imagenette_root / "train" / "n01440764").iterdir())[:70]:
        shutil.copy(path, root / path.name)
    (tmp_path / "data" / "train" / "n02102040").mkdir()
    shutil.copy(path, tmp_path / "data" / "train" / "n02102040" / path.name)
    scan = packing._SplitWriter.__init__

    def scan_then_grow(self, *args, **kwargs):
        scan(self, *args, **kwargs)
        with self.samples[0][1].open("ab") as image:  # 1.5 KiB more: 3 tar blocks
            image.write(b"\0" * 1536)

    monkeypatch.setattr(packing._SplitWriter, "__init__", scan_then_grow)
    pack_folder(tmp_path / "data", tmp_path / "shards", splits=["train"], progress=False)
    (shard,) = read_index(tmp_path / "shards").splits["train"].shards
    with tarfile.open(tmp_path / "shards" / shard.file) as tar:
        members = tar.getmembers()
    assert shard.offsets == [members[0].offset, members[2 * OFFSET_EVERY].offset]
    images = ShardImages(tmp_path / "shards", "train", transform=digest, shuffle=False)
    assert stream(images, start=OFFSET_EVERY) == stream(images)[OFFSET_EVERY:]


def test_shards_are_tars_of_the_original_files(packed, folders):
    for name, folder in folders.items():
        originals = {f"{folder.class_ids[label]}/{path.stem}": (path, label)
                     for path, label in zip(folder.paths, folder.labels, strict=True)}
        keys = []
        for shard in read_index(packed).splits[name].shards:
            with tarfile.open(packed / shard.file) as tar:
                members = tar.getmembers()
                names = [m.name for m in members]
                assert names[0::2] == [n.removesuffix(".cls") + ".jpg" for n in names[1::2]]
                for image, label in zip(members[0::2], members[1::2], strict=True):
                    key = image.name.removesuffix(".jpg")
                    path, expected = originals[key]
                    assert tar.extractfile(image).read() == path.read_bytes()
                    assert tar.extractfile(label).read() == str(expected).encode()
                    keys.append(key)
        assert sorted(keys) == sorted(originals)
        if name == "val":  # in the folder reader's order; training shards are mixed
            assert keys == list(originals)


@pytest.mark.parametrize("workers", [0, 2])
def test_each_epoch_reads_every_training_image_once(packed, train_digests, workers):
    # batch_size 1 (the default): whole batches of 25 per worker would hold some images back
    images = ShardImages(packed, "train", transform=digest, shuffle_buffer=200, workers=workers)
    assert len(images) == 1000
    loader = DataLoader(images, batch_size=25, num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0)
    orders = []
    for epoch in (0, 1):  # persistent workers see the epoch change too
        images.set_epoch(epoch)
        orders.append([name for names, _ in loader for name in names])
        assert Counter(orders[-1]) == Counter(train_digests)
    assert orders[0] != orders[1]


def test_shards_are_the_fewest_of_equal_counts_that_fit() -> None:
    # Ten samples of 100 kB in shards of 350 kB: four shards of 2-3 (a greedy cut would give
    # 3, 3, 3, 1, and a rank dealt the 1 would cut every rank's epoch short).
    assert _even_bounds([100_000] * 10, 350_000) == [0, 2, 5, 7, 10]
    assert _even_bounds([10, 10**6, 10], 100_000) == [0, 1, 2, 3]  # one image a shard at least
    assert _even_bounds([], 100_000) == [0]


def test_one_shard_read_by_many_workers_loses_only_the_last_partial_batch(
    imagenette_root, tmp_path
):
    out = tmp_path / "one"
    pack_folder(imagenette_root, out, splits=["train"], progress=False)
    assert len(read_index(out).splits["train"].shards) == 1
    images = ShardImages(out, "train", transform=digest, batch_size=16, workers=2)
    assert len(images) == 1000 // 16 * 16  # the idle second worker holds nothing back
    assert len(stream(images)) == len(images)


def test_packing_one_split_keeps_the_other_splits_of_an_earlier_pack(
    imagenette_root, tmp_path, capsys
):
    """As the missing-split error advises: pack val, then train into the same folder; both
    end up in the index, val's shards untouched. Another shard size replaces the whole pack."""
    out = tmp_path / "shards"
    pack_folder(imagenette_root, out, splits=["val"], progress=False)
    val = read_index(out).splits["val"]
    val_bytes = {shard.file: (out / shard.file).read_bytes() for shard in val.shards}
    main(["pack", str(imagenette_root), "--out", str(out), "--splits", "train"])
    assert "(kept from the earlier pack)" in capsys.readouterr().out
    index = read_index(out)
    assert list(index.splits) == ["train", "val"] and index.splits["val"] == val
    assert {f: (out / f).read_bytes() for f in val_bytes} == val_bytes
    # A review found a pack at another size (the default, as the missing-split error then
    # advised) deleting the other split: it is refused, and nothing is lost.
    with pytest.raises(DataError, match=r"shards: its val split\(s\) were packed with "
                       r"--shard-size 1000000000, and would not go with this pack's train: pack "
                       r"with --shard-size 1000000000 to keep them, add them to --splits"):
        pack_folder(imagenette_root, out, shard_bytes=10**6, splits=["train"], progress=False)
    assert read_index(out) == index
    assert {f: (out / f).read_bytes() for f in val_bytes} == val_bytes
    pack_folder(imagenette_root, out, shard_bytes=10**6, splits=["train", "val"], progress=False)
    assert read_index(out).shard_bytes == 10**6


def test_packing_one_split_over_an_unreadable_index_deletes_no_other_split(
    imagenette_root, tmp_path
):
    """An index.json it cannot read (or none) names no split to keep: packing train alone
    swept val's shards as an unindexed pack's (a review found it, with an index the checks
    refuse)."""
    out = tmp_path / "shards"
    pack_folder(imagenette_root, out, progress=False)
    val = sorted(path.name for path in out.glob("val-*.tar"))
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**index, "classes": index["classes"][:3]}))
    with pytest.raises(DataError, match=r"10 class_ids but 3 classes; re-run canon pack\. "
                       r"Packing train alone would delete val-000000\.tar of the "
                       r"splits it does not pack: pack every split \(--splits train,val\)"):
        pack_folder(imagenette_root, out, splits=["train"], progress=False)
    (out / "index.json").unlink()  # nor without one
    with pytest.raises(DataError, match=r"shards without their index.json .* would delete "
                                        r"val-000000\.tar"):
        pack_folder(imagenette_root, out, splits=["train"], progress=False)
    assert sorted(path.name for path in out.glob("val-*.tar")) == val
    pack_folder(imagenette_root, out, progress=False)
    assert read_index(out).classes == index["classes"]


def test_a_pack_killed_midway_keeps_the_splits_it_was_not_packing(
    imagenette_root, tmp_path, monkeypatch, capsys
):
    """Re-packing val over a pack of train and val, killed while writing val: train is still
    indexed and readable, and packing val again keeps it (the index was deleted up front, and
    the re-run then swept train's shards as an unindexed pack's)."""
    out = tmp_path / "shards"
    pack_folder(imagenette_root, out, splits=["train", "val"], progress=False)
    train = read_index(out).splits["train"]
    write = packing._SplitWriter.write

    def killed(self):
        write(self)
        raise KeyboardInterrupt  # the shards written, the index not

    def stopped_while_listing(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(packing._SplitWriter, "write", killed)
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C: what it leaves, and how to go on
        main(["pack", str(imagenette_root), "--out", str(out), "--splits", "val"])
    assert stopped.value.code == 130
    assert capsys.readouterr().err.endswith(
        f"canon pack: stopped; {out} holds no val split(s) until a pack of them ends (the "
        "splits it does not pack are kept): run the same command again, which packs them from "
        "the start\n")
    assert read_index(out).splits == {"train": train}
    assert len(ShardImages(out, "train", shuffle=False)) == train.samples
    with monkeypatch.context() as scanning:  # stopped before it changed anything
        scanning.setattr(packing, "_open_splits", stopped_while_listing)
        with pytest.raises(SystemExit):
            main(["pack", str(imagenette_root), "--out", str(out), "--splits", "train"])
    assert capsys.readouterr().err.endswith(f"canon pack: stopped; the index of {out} still "
                                            "names train: run the same command again\n")
    assert read_index(out).splits == {"train": train}
    with pytest.raises(DataError, match=r"no val split \(it holds train\); its val shards are "
                                        r"being packed, or a pack of them stopped before its end"
                                        r".* with `canon pack .* --out .*shards --splits val "
                                        r"--shard-size 1000000000`$"):
        ShardImages(out, "val")
    monkeypatch.setattr(packing._SplitWriter, "write", write)
    pack_folder(imagenette_root, out, splits=["val"], progress=False)
    assert list(read_index(out).splits) == ["train", "val"]
    assert read_index(out).splits["train"] == train


def test_the_same_seed_and_epoch_give_the_same_stream(packed):
    def images(seed: int) -> ShardImages:
        return ShardImages(packed, "train", transform=digest, seed=seed, shuffle_buffer=100)

    first = stream(images(0), epoch=3)
    assert stream(images(0), epoch=3) == first
    assert stream(images(1), epoch=3) != first


@pytest.mark.parametrize(("world_size", "batch_size", "workers"),
                         [(2, 16, 2), (3, 1, 0), (9, 1, 0)])
def test_ranks_read_disjoint_equal_shares_that_cover_the_epoch(
    packed, train_digests, world_size, batch_size, workers
):
    """7 shards of 142-143 images: 2 ranks take 3 whole shards each and half the seventh, 3
    ranks 2 each and a third of the last one (a rank dealt a whole extra shard would cut
    every rank's epoch short by it), 9 ranks, more than the shards, a ninth of each."""
    shares = [stream(ShardImages(packed, "train", transform=digest, rank=rank,
                                 world_size=world_size, batch_size=batch_size,
                                 workers=workers), epoch=1)
              for rank in range(world_size)]
    assert len({len(share) for share in shares}) == 1 and len(shares[0]) % batch_size == 0
    names = [{name for name, _ in share} for share in shares]
    read = set().union(*names)
    assert sum(map(len, names)) == len(read) and read <= set(train_digests)
    # Left out: less than a batch per worker, and a sample per shard each rank reads from.
    per_rank = max(workers, 1) * (batch_size - 1) + 7 // world_size + 7 % world_size
    assert len(read) >= len(train_digests) - world_size * per_rank


def test_a_pack_without_recorded_offsets_reads_the_same_parts(packed, tmp_path):
    """Packs made before canon recorded sample offsets: the parts of left-over shards are
    found by walking the headers from the start instead."""
    old = tmp_path / "old"
    shutil.copytree(packed, old)
    index = json.loads((old / "index.json").read_text())
    for split in index["splits"].values():
        for shard in split["shards"]:
            del shard["offsets"]
    (old / "index.json").write_text(json.dumps(index))
    assert read_index(old).splits["train"].shards[0].offsets == []
    for world_size in (2, 3):
        for rank in range(world_size):
            images = [ShardImages(folder, "train", transform=digest, rank=rank,
                                  world_size=world_size, shuffle_buffer=0)
                      for folder in (packed, old)]
            assert stream(images[0], epoch=4) == stream(images[1], epoch=4)


def test_a_shard_of_fewer_images_than_ranks_is_read_once(imagenette_root, tmp_path):
    """Five one-image shards on three ranks: the two left over give some ranks no part."""
    root = tmp_path / "five"
    for wnid, count in (("n01440764", 3), ("n02102040", 2)):
        (root / "train" / wnid).mkdir(parents=True)
        for path in sorted((imagenette_root / "train" / wnid).iterdir())[:count]:
            shutil.copy(path, root / "train" / wnid / path.name)
    with pytest.warns(UserWarning, match=r"^a shard size of 1 bytes holds not even train's "
                      r"largest image \(a tar file of it takes [\d,]+ bytes\): its 5 shards "
                      r"hold one image each; shards of 100 MB to 1 GB stream best "
                      r"\(--shard-size 1GB\)$"):
        pack_folder(root, tmp_path / "shards", shard_bytes=1, splits=["train"], progress=False)
    assert len(read_index(tmp_path / "shards").splits["train"].shards) == 5
    ranks = [ShardImages(tmp_path / "shards", "train", transform=digest, rank=rank,
                         world_size=3) for rank in range(3)]
    for epoch in range(8):  # through the shuffle buffer, a sample read twice may come out
        names = [name for images in ranks for name, _ in stream(images, epoch)]
        assert len(names) == len(set(names)) == 3, epoch


def test_evaluation_reads_every_image_once_in_order_as_the_folder_reader(packed, folders,
                                                                          val_digests):
    val = folders["val"]
    images = ShardImages(packed, "val", shuffle=False)
    assert len(images) == len(val)
    for i, (image, label) in enumerate(images):
        expected, expected_label = val[i]
        assert label == expected_label and torch.equal(image, expected)
    ranks = [ShardImages(packed, "val", shuffle=False, transform=digest, rank=r, world_size=3)
             for r in range(3)]
    assert sum(len(r) for r in ranks) == len(val)
    read = [item for r in ranks for item in stream(r)]
    assert sorted(read) == sorted(zip(val_digests, val.labels, strict=True))


def test_evaluation_batches_come_in_pack_order_at_any_batch_size(packed, val_digests):
    # An ensemble's members load at different batch sizes (views per image) and pair scores
    # image by image: the order must not depend on the batch size or the number of workers.
    split = ShardImages(packed, "val", shuffle=False, transform=digest)
    for batch_size in (7, 200):  # 72 batches and 3, so one worker has one more
        loader = build_loader(split, batch_size, train=False, workers=2)
        assert [name for names, _ in loader for name in names] == val_digests, batch_size


def test_a_training_stream_is_read_at_its_loader_s_batch_size_and_workers(packed):
    """build_loader(train=True) on a stream made for one process reads a copy made for its
    own: the same images an epoch, every one once (it failed in a worker before)."""
    images = ShardImages(packed, "train", transform=digest, seed=3)
    loader = build_loader(images, 16, train=True, workers=2)
    assert (loader.dataset.batch_size, loader.dataset.workers) == (16, 2)
    read = [name for names, _ in loader for name in names]
    assert len(read) == len(loader.dataset) and len(set(read)) == len(read)
    assert set(read) <= {name for name, _ in stream(images, epoch=0)}


@pytest.mark.parametrize(("workers", "start"), [(0, 37), (2, 5 * 16), (2, 9 * 16)])
def test_a_resumed_epoch_continues_the_same_stream(packed, workers, start):
    images = ShardImages(packed, "train", transform=digest, workers=workers, batch_size=16,
                         shuffle_buffer=100)
    whole = stream(images, epoch=2)
    assert stream(images, epoch=2, start=start) == whole[start:]
    if workers:
        with pytest.raises(ConfigError, match="not a multiple of batch_size"):
            images.set_epoch(2, start + 1)
    with pytest.raises(ConfigError, match=rf"beyond this rank's {len(images)} samples.*workers"):
        images.set_epoch(2, len(images) + 16)


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda index: index["splits"]["train"]["shards"][0].update(samples="54"),
     r"split train, shard 'train-000000.tar': samples, bytes or offsets are not counts"),
    (lambda index: index["splits"]["train"]["shards"][1].update(bytes=None),
     r"shard 'train-000001.tar': samples, bytes or offsets are not counts"),
    (lambda index: index["splits"]["val"]["shards"][0].update(samples=1.0),
     r"shard 'val-000000.tar': samples, bytes or offsets are not counts"),
    (lambda index: index.update(classes=index["classes"][:3]),
     r"10 class_ids but 3 classes"),
    (lambda index: index["splits"]["train"]["shards"][0]["class_counts"].pop(),
     r"class_counts are not 10 counts adding up to its \d+ samples"),
    (lambda index: index["splits"]["val"]["shards"][0].update(file="train-000000.tar"),
     r"split val, shard 'train-000000.tar': not a val shard's file name"),
    (lambda index: index.update(shard_bytes="1GB"), r"shard_bytes is '1GB', not a size"),
])
def test_a_hand_edited_index_is_refused_naming_what_is_wrong(packed, tmp_path, edit, problem):
    """A journey's edits of index.json each gave a traceback, or (classes cut) a model of 3
    outputs failing mid-epoch on a label of 8."""
    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    index = json.loads((copy / "index.json").read_text())
    edit(index)
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=rf"copy/index\.json: .*{problem}.*; re-run canon pack$"):
        read_index(copy)


def test_shards_without_their_index_are_named_so(packed, tmp_path):
    """Not read as an image folder ("no train folder"): the index is missing, and a pack
    makes it again."""
    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    (copy / "index.json").unlink()
    assert is_shard_folder(copy)
    with pytest.raises(DataError, match=r"copy: shards without their index.json .*canon pack"):
        open_dataset(str(copy))


def test_a_damaged_shard_is_named(packed, imagenette_root, tmp_path):
    copy = tmp_path / "a copy"  # a command to paste quotes it
    shutil.copytree(packed, copy)
    shard = copy / "train-000002.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:100_000])
    with pytest.raises(DataError, match=r"train-000002.tar.*cut short"):
        open_dataset(str(copy))  # before training, not when its turn comes
    with pytest.raises(DataError, match=r"train-000002.tar.*cut short") as cut:
        list(ShardImages(copy, "train", shuffle=False))
    # The command it gives makes the same shards again, as a resumed run needs (a review
    # found "re-run canon pack", at the default size, making others).
    command = str(cut.value).split("`")[1]
    assert command == (f"canon pack {Path(imagenette_root).resolve()} --out '{copy}' --splits "
                       f"train --shard-size {SHARD_BYTES}")
    main(shlex.split(command)[1:])
    assert shard.read_bytes() == whole
    assert read_index(copy) == read_index(packed)
    validation = copy / "val-000000.tar"
    validation.rename(copy / "elsewhere.tar")
    with pytest.raises(DataError, match=r"val-000000.tar: missing, index.json says"):
        open_dataset(str(copy))  # not after an epoch of training
    (copy / "elsewhere.tar").rename(validation)
    damaged = bytearray(whole)
    damaged[5] ^= 0x01  # a byte of the first member's name: the header's checksum fails
    shard.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"train-000002.tar: unreadable shard \(bad checksum"
                                        r".*re-pack it with `canon pack"):
        list(ShardImages(copy, "train", shuffle=False))
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:  # a class label damaged in place
        label = next(member for member in tar.getmembers() if member.name.endswith(".cls"))
    damaged = bytearray(whole)
    damaged[label.offset_data] = ord("x")
    shard.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"train-000002.tar: sample 0 \(.*\) has class 'x', "
                                        r"not one of index.json's 10"):
        list(ShardImages(copy, "train", shuffle=False))
    (copy / "index.json").write_bytes(b"\x00" * 64)  # its index overwritten
    with pytest.raises(DataError, match=r"index\.json: not valid JSON.*re-run canon pack"):
        open_dataset(str(copy))


@pytest.fixture
def with_bad_image(imagenette_root, tmp_path) -> Path:
    """Two classes of two real JPEGs in train/ and val/, one training file corrupt."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for wnid in ("n01440764", "n02102040"):
            for path in sorted((imagenette_root / split / wnid).iterdir())[:2]:
                (root / split / wnid).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, root / split / wnid / path.name)
    (root / "train" / "n02102040" / "broken.JPEG").write_bytes(b"\xff\xd8 not a JPEG")
    return root


def test_an_undecodable_image_is_skipped_or_strict(with_bad_image, tmp_path):
    out = tmp_path / "shards"
    pack_folder(with_bad_image, out, progress=False)
    with pytest.warns(BadImageWarning, match="broken"):
        items = list(ShardImages(out, "train", shuffle=False))
    assert len(items) == 5 and sum(item is None for item in items) == 1
    with pytest.raises(DataError, match=r"n02102040/broken.jpg"):
        list(ShardImages(out, "train", shuffle=False, strict=True))


def test_a_val_split_packed_from_test_is_still_the_test_set(with_bad_image, packed, tmp_path):
    """A run validating on it chooses no best epoch on test images, as it would on the folder:
    its index says which folder the split was packed from; an older pack's source says it."""
    (with_bad_image / "val").rename(with_bad_image / "test")
    out = tmp_path / "shards"
    pack_folder(with_bad_image, out, progress=False)
    assert read_index(out).splits["val"].folder == "test"
    assert validates_on_test_split(DataConfig(dataset=str(out)))
    assert not validates_on_test_split(DataConfig(dataset=str(packed)))
    index = json.loads((out / "index.json").read_text())
    del index["splits"]["val"]["folder"]  # as a pack made before canon recorded it
    (out / "index.json").write_text(json.dumps(index))
    assert validates_on_test_split(DataConfig(dataset=str(out)))


def test_a_class_packed_from_an_empty_folder_is_warned_of_when_read(with_bad_image, packed,
                                                                    tmp_path):
    """As the folder reader warns of an empty class folder whenever it lists it, so a shard
    split whenever it is opened, once (a journey trained on such shards without a word)."""
    (with_bad_image / "train" / "n03000684").mkdir()  # after both: a class of no images
    (with_bad_image / "val" / "n03000684").mkdir()
    out = tmp_path / "shards"
    with pytest.warns(BadImageWarning, match="empty class folder"):
        pack_folder(with_bad_image, out, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        open_dataset(str(out))
    assert [str(w.message) for w in caught] == [
        f"{out}: {split} class(es) n03000684 hold no image (none of their files was readable "
        "when packed)" for split in ("train", "val")]
    with warnings.catch_warnings():  # classes that all hold images: no word
        warnings.simplefilter("error")
        open_dataset(str(packed))


def test_pack_refuses_folders_it_would_damage(with_bad_image, packed, tmp_path):
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="notes: not empty and not a canon pack"):
        pack_folder(with_bad_image, unrelated, progress=False)
    with pytest.raises(DataError, match=r"holds a pack of .*imagenette2-160-mini"):
        pack_folder(with_bad_image, packed, progress=False)
    with pytest.raises(DataError, match="inside the folder it packs"):
        pack_folder(with_bad_image, with_bad_image / "train" / "shards", progress=False)
    with pytest.raises(DataError, match="inside the folder it packs"):  # a split not packed
        pack_folder(with_bad_image, with_bad_image / "val" / "shards", splits=["train"],
                    progress=False)
    with pytest.raises(DataError, match="missing: not a folder"):
        pack_folder(tmp_path / "missing", tmp_path / "out", progress=False)
    val_only = tmp_path / "val-only"
    shutil.copytree(with_bad_image / "val", val_only / "val")
    with pytest.raises(DataError, match=r"val-only: no train/ folder; a val split is packed "
                                        r"labelled by the training split's classes"):
        pack_folder(val_only, tmp_path / "out", splits=["val"], progress=False)
    with pytest.raises(DataError, match=r"train is itself the train/ split of .*: give that"):
        pack_folder(with_bad_image / "train", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="not a shard folder"):
        ShardImages(unrelated, "train")


# A pack that stops after filling its first shard's temporary file, before renaming it.
PACK_AND_HANG = """
import sys, time
from canon.data import packing
fill = packing._SplitWriter._fill
def fill_then_hang(*args, **kwargs):
    fill(*args, **kwargs)
    print("filled", flush=True)
    time.sleep(600)
packing._SplitWriter._fill = fill_then_hang
packing.pack_folder(sys.argv[1], sys.argv[2], shard_bytes=1, progress=False)
"""


def test_a_second_pack_into_a_folder_being_packed_is_refused(with_bad_image, tmp_path):
    """It would sweep the first pack's shard being written as a killed pack's and write the
    same shards; once the first is killed, its lock no longer stands in the way."""
    out = tmp_path / "shards"
    child = subprocess.Popen([sys.executable, "-c", PACK_AND_HANG, str(with_bad_image), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "filled\n", child.stderr.read()
        being_written = [p for p in out.iterdir() if p.name.startswith(".train-000000.tar.")]
        assert len(being_written) == 1
        with pytest.raises(DataError, match=rf"{out} is in use by another canon pack \(pid "
                                            rf"{child.pid}\); wait for it or choose another"):
            pack_folder(with_bad_image, out, progress=False)
        # A run into it is refused too, naming what holds it: the pack, not "another run".
        with pytest.raises(DataError, match=rf"{out} is in use by another canon pack \(pid "
                                            rf"{child.pid}\); wait for it or use another"), \
                claim_run_dir(out, resume=False):
            pass
        assert being_written[0].exists()
    finally:
        child.kill()
        child.wait(timeout=60)
    index = pack_folder(with_bad_image, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "train-000000.tar",
                                                     "val-000000.tar"]
    assert index.splits["train"].samples == 5


def test_pack_command_replaces_its_own_pack(with_bad_image, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="canon")
    add_pack_parser(parser.add_subparsers())
    command = ["pack", str(with_bad_image), "--out", str(tmp_path / "shards"), "--shard-size"]
    with pytest.warns(UserWarning, match=r"a shard size of 1 bytes holds not even"):
        args = parser.parse_args([*command, "1"])  # a shard per image,
        args.run(args)
    args = parser.parse_args([*command, "1GB"])  # then one shard per split
    args.run(args)
    output = capsys.readouterr().out
    assert "train: 5 shards, 5 images" in output and "train: 1 shards, 5 images" in output
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "index.json", "train-000000.tar", "val-000000.tar"]
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("2GiB") == 2**31
