"""Datasets on real files: CIFAR pickles, ImageNet-layout JPEG trees, the bundled sample, and a
folder of the bad files real datasets contain."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from canon.data import BadImageWarning, DataConfig, build_datasets, build_loader
from canon.data.cifar import (
    CIFAR,
    download_and_verify,
    extract_tar,
    fetch_cifar,
    read_cifar,
)
from canon.data.datasets import load_sample, open_dataset, open_eval_split
from canon.data.decoding import decode_image_file, image_size
from canon.data.folders import FolderImages
from canon.data.packing import pack_folder
from canon.data.shards import ShardImages
from canon.data.stats import compute_stats, statistics_of, stats_cache_path
from canon.errors import ConfigError, DataError
from canon.evaluation.protocols import evaluate
from canon.files import file_digest
from canon.models.factory import create_model

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


@pytest.fixture(scope="module")
def cifar_train(cifar10_root):
    return read_cifar("cifar10", cifar10_root / "cifar-10-batches-py", "train")


def test_cifar10_reader(cifar10_root, cifar_train):
    test = read_cifar("cifar10", cifar10_root / "cifar-10-batches-py", "test")
    assert (len(cifar_train), len(test)) == (50000, 10000)
    assert cifar_train.classes == CIFAR10_CLASSES
    assert np.bincount(cifar_train.labels).tolist() == [5000] * 10
    image, label = cifar_train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 6  # a frog
    # The folder holding cifar-10-batches-py and the folder itself both work.
    for root in (cifar10_root, cifar10_root / "cifar-10-batches-py"):
        train, _ = open_dataset(str(root))
        assert torch.equal(train.images[:5], cifar_train.images[:5])


def test_sample_is_the_documented_cifar_subset(cifar_train):
    """PROVENANCE.md: the first 500 training images of each class, pixels unchanged."""
    sample = load_sample("train")
    taken, chosen = dict.fromkeys(range(10), 0), []
    for index, label in enumerate(cifar_train.labels):
        if taken[label] < 500:
            taken[label] += 1
            chosen.append(index)
    assert torch.equal(sample.images, cifar_train.images[chosen])
    assert sample.labels == [cifar_train.labels[i] for i in chosen]
    test = load_sample("test")
    assert len(test) == 1000 and np.bincount(test.labels).tolist() == [100] * 10
    assert sample.classes == CIFAR10_CLASSES


def test_cifar100_reader_uses_fine_labels(tmp_path, cifar10_root):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    source = cifar10_root / "cifar-10-batches-py" / "test_batch"
    with open(source, "rb") as f:
        batch = pickle.load(f)
    fine = [(label * 7) % 100 for label in batch["labels"]]
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": batch["data"], b"fine_labels": fine, b"coarse_labels": fine}, f)
    names = [f"class{i:02d}" for i in range(100)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names]}, f)
    test = read_cifar("cifar100", folder, "test")
    assert test.classes == names and test.labels == fine and len(test) == 10000


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    ran = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (ran.touch, ())

    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": Evil()}))
    with pytest.raises(DataError, match=r"batches\.meta: not a CIFAR pickle \(refusing to load "
                                        r"builtins\.getattr\)"):  # how a bound method pickles
        read_cifar("cifar10", folder, "test")
    assert not ran.exists()


def test_download_verifies_md5(tmp_path):
    payload = tmp_path / "archive.bin"
    payload.write_bytes(b"real bytes " * 1000)
    good = hashlib.md5(payload.read_bytes()).hexdigest()
    target = tmp_path / "cache" / "archive.bin"
    with pytest.raises(DataError, match="does not match"):
        download_and_verify(payload.as_uri(), target, "0" * 32)
    assert not target.exists() and not list(target.parent.iterdir())
    assert download_and_verify(payload.as_uri(), target, good).read_bytes() == payload.read_bytes()
    # A verified file is not fetched again (the address is gone now).
    payload.unlink()
    assert download_and_verify(payload.as_uri(), target, good) == target
    with pytest.raises(DataError, match=r"cannot download .*fetch it by hand"):
        download_and_verify(payload.as_uri(), tmp_path / "other.bin", good)
    # Offline with a damaged copy in place: the copy is named as the fault, and kept.
    target.write_bytes(b"cut short")
    with pytest.raises(DataError, match=f"{target} is there but damaged or incomplete"):
        download_and_verify(payload.as_uri(), target, good)
    assert target.read_bytes() == b"cut short"


def test_extract_refuses_paths_outside(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match="unsafe"):
        extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def archive_in_cache(tmp_path: Path, monkeypatch, **spec: str) -> Path:
    """A cifar-10-python.tar.gz holding batches.meta alone in tmp_path/cache, CIFAR-10's md5
    (and `spec`) patched to match it: the cache folder."""
    source = tmp_path / "source" / "cifar-10-batches-py"
    source.mkdir(parents=True)
    (source / "batches.meta").write_bytes(b"meta")
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
    monkeypatch.setitem(CIFAR, "cifar10", {**CIFAR["cifar10"], **spec,
                                           "md5": file_digest(archive, "md5")})
    return cache


def test_missing_cifar_without_download_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"data\.download.*place cifar-10-python\.tar\.gz at"):
        fetch_cifar("cifar10", tmp_path, download=False)
    assert CIFAR["cifar10"]["md5"] == "c58f30108f718f92721af3b95e74349a"
    # Offline, an archive placed by hand (as that advice says) is verified and unpacked.
    cache = archive_in_cache(tmp_path, monkeypatch,
                             url="https://offline.invalid/cifar-10-python.tar.gz")
    archive = cache / "cifar-10-python.tar.gz"
    folder = fetch_cifar("cifar10", cache, download=False)
    assert (folder / "batches.meta").read_bytes() == b"meta"
    shutil.rmtree(folder)
    archive.write_bytes(archive.read_bytes()[:-10])  # cut short: refused, not fetched
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz is damaged or incomplete"):
        fetch_cifar("cifar10", cache, download=False)


def test_a_cifar_name_beside_a_folder_of_that_name_says_which_it_reads(tmp_path, monkeypatch):
    """`--data cifar10` is canon's copy, also where ./cifar10 holds one: said, not guessed."""
    (tmp_path / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with (pytest.warns(UserWarning, match=r"names canon's copy in .*cache.*: give it as "
                       r"\./cifar10 to read that one"),
          pytest.raises(DataError, match=r"cifar10 is not in")):
        open_dataset("cifar10", cache=tmp_path / "cache", download=False)


def test_a_cifar_copy_unpacked_by_another_process_first_is_taken(tmp_path, monkeypatch):
    """Runs started together (canon reproduce --jobs) each unpack the archive; the first to
    move its copy in place wins and the others use it."""
    source = tmp_path / "source"
    (source / "cifar-10-batches-py").mkdir(parents=True)
    (source / "cifar-10-batches-py" / "batches.meta").write_bytes(b"meta")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(CIFAR, "cifar10", {**CIFAR["cifar10"], "url": archive.as_uri(),
                                           "md5": file_digest(archive, "md5")})
    cache = tmp_path / "cache"
    cache.mkdir()

    def unpack_while_a_rival_finishes(tar: Path, destination: Path) -> None:
        extract_tar(tar, destination)
        shutil.copytree(destination / "cifar-10-batches-py", cache / "cifar-10-batches-py")

    monkeypatch.setattr("canon.data.cifar.extract_tar", unpack_while_a_rival_finishes)
    folder = fetch_cifar("cifar10", cache, download=True)
    assert (folder / "batches.meta").read_bytes() == b"meta"
    assert sorted(p.name for p in cache.iterdir()) == ["cifar-10-batches-py",
                                                       "cifar-10-python.tar.gz"]


def test_an_unpacking_that_cannot_write_says_so_and_old_leftovers_go(tmp_path, monkeypatch):
    """A full disk while unpacking is a one-line error naming the cache; the scratch folder
    of an unpacking killed a day ago is deleted, a recent one (another process's) kept."""
    cache = archive_in_cache(tmp_path, monkeypatch)
    killed, live = cache / ".unpacking-killed", cache / ".unpacking-live"
    for scratch in (killed, live):
        (scratch / "cifar-10-batches-py").mkdir(parents=True)
    os.utime(killed, (time.time() - 2 * 24 * 3600,) * 2)

    def disk_full(archive: Path, destination: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("canon.data.cifar.extract_tar", disk_full)
    with pytest.raises(DataError, match=r"cannot write .*cifar-10-batches-py: No space left on "
                                        r"device; free some space or choose a writable cache"):
        fetch_cifar("cifar10", cache, download=False)

    def unsafe(archive: Path, destination: Path) -> None:
        raise DataError(f"{archive}: unsafe member '../x'; not extracting")

    monkeypatch.setattr("canon.data.cifar.extract_tar", unsafe)  # its own error, as it is
    with pytest.raises(DataError, match=r"^\S*cifar-10-python.tar.gz: unsafe member"):
        fetch_cifar("cifar10", cache, download=False)
    assert sorted(p.name for p in cache.iterdir()) == [".unpacking-live",
                                                       "cifar-10-python.tar.gz"]


def test_an_incomplete_cifar_folder_is_named_and_kept(tmp_path):
    """A copy cut short (no batches.meta) is not downloaded over nor deleted; a folder in
    place of a batch file is a DataError naming it."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"half")
    with pytest.raises(DataError, match=r"cifar-10-batches-py has no batches\.meta.*remove"):
        fetch_cifar("cifar10", tmp_path, download=True)
    assert (folder / "data_batch_1").read_bytes() == b"half"
    # given as --data: named as the CIFAR folder it is, not as a wrong ImageNet layout
    with pytest.raises(DataError, match=r"batches\.meta: missing \(the CIFAR folder is"):
        open_dataset(str(tmp_path))
    with pytest.raises(DataError, match=r"batches\.meta: missing .*: replace it from a complete "
                                        r"copy \(a copy in canon's cache is downloaded afresh"):
        read_cifar("cifar10", folder, "test")  # canon never downloads over a folder it finds
    (folder / "batches.meta").mkdir()
    with pytest.raises(DataError, match=r"batches\.meta: cannot read"):
        read_cifar("cifar10", folder, "test")
    (folder / "batches.meta").rmdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({"names": ["cat"]})[:-3])  # cut short
    with pytest.raises(DataError, match=r"batches\.meta: not a CIFAR pickle \(.*\): replace it "
                                        r"from a complete copy \(a copy in canon's cache is"):
        read_cifar("cifar10", folder, "test")
    (folder / "batches.meta").write_bytes(pickle.dumps({"names": ["cat"]}))
    with pytest.raises(DataError, match=r"batches\.meta: not a CIFAR pickle \(no 'label_names'; "
                                        r"it holds names\)"):
        read_cifar("cifar10", folder, "test")
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [b"cat", b"dog"]}))
    data = np.zeros((3, 3072), dtype=np.uint8)
    for labels, error in (([0, 1], r"3 images but 2 labels"),
                          ([0, 1, 2], r"labels outside 0..1, the 2 classes of batches.meta")):
        (folder / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": labels}))
        with pytest.raises(DataError, match=r"test_batch: " + error):
            read_cifar("cifar10", folder, "test")
    (folder / "test_batch").write_bytes(pickle.dumps({"data": data}))
    with pytest.raises(DataError, match=r"test_batch: not a CIFAR pickle \(no 'labels'"):
        read_cifar("cifar10", folder, "test")
    # a copy re-saved with pickle's protocol 5 stores its arrays otherwise: it reads alike
    (folder / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": [0, 1, 1]},
                                                     protocol=5))
    with pytest.raises(DataError, match=r"test split has 3 images, expected 10000"):
        read_cifar("cifar10", folder, "test")


def test_imagenet_layout(imagenette_root):
    train, val = open_dataset(str(imagenette_root))
    assert (len(train), len(val)) == (1000, 500)
    assert train.class_ids == val.class_ids and train.class_ids[0] == "n01440764"
    image, label = val[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and min(image.shape[1:]) == 160
    assert label == 0


def _link_tree(root: Path, source: Path, classes: dict[str, list[str]], count: int) -> None:
    for split, wnids in classes.items():
        for wnid in wnids:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for path in sorted((source / split / wnid).iterdir())[:count]:
                (folder / path.name).symlink_to(path)


def test_class_names_from_synset_mapping(tmp_path, imagenette_root):
    wnids = ["n01440764", "n02102040"]
    _link_tree(tmp_path, imagenette_root, {"train": wnids, "val": wnids}, 2)
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn02102040 English springer, English springer spaniel\n"
    )
    train, val = open_dataset(str(tmp_path))
    assert train.classes == val.classes == ["tench", "English springer"]
    (tmp_path / "LOC_synset_mapping.txt").write_text(  # first synonyms alike: told apart
        "n01440764 crane\nn02102040 crane, derrick\n")
    assert open_dataset(str(tmp_path))[0].classes == ["crane (n01440764)", "crane (n02102040)"]
    (tmp_path / "LOC_synset_mapping.txt").unlink()  # torchvision's names of ImageNet's wnids
    assert open_dataset(str(tmp_path))[0].classes == ["tench", "English springer"]
    (tmp_path / "train" / "n02102040").rename(tmp_path / "train" / "dogs")
    (tmp_path / "val" / "n02102040").rename(tmp_path / "val" / "dogs")
    assert open_dataset(str(tmp_path))[0].classes == ["dogs", "tench"]  # other names kept


def test_train_and_val_classes_must_match(tmp_path, imagenette_root):
    _link_tree(tmp_path, imagenette_root,
               {"train": ["n01440764", "n02102040"], "val": ["n01440764", "n02979186"]}, 1)
    with pytest.raises(DataError, match=r"only in train: n02102040; only in val: n02979186"):
        open_dataset(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The bad-input folder


@pytest.fixture
def bad_tree(tmp_path, imagenette_root):
    """train/ and val/ with good/ (CMYK, greyscale, PNG named .JPEG, plain JPEG), bad/
    (truncated, zero-byte, text named .JPEG, notes.txt) and empty/ (no files)."""
    source = sorted((imagenette_root / "train" / "n01440764").iterdir())[0]
    original = Image.open(source).convert("RGB")
    data = source.read_bytes()
    for split in ("train", "val"):
        good, bad = tmp_path / split / "good", tmp_path / split / "bad"
        good.mkdir(parents=True)
        bad.mkdir()
        (tmp_path / split / "empty").mkdir()
        original.convert("CMYK").save(good / "cmyk.JPEG", quality=95)
        original.convert("L").save(good / "grey.JPEG", quality=95)
        original.save(good / "png_named.JPEG", format="PNG")
        (good / "plain.JPEG").write_bytes(data)
        (bad / "truncated.JPEG").write_bytes(data[: len(data) // 2])
        (bad / "zero.JPEG").write_bytes(b"")
        (bad / "text.JPEG").write_text("not an image\n")
        (bad / "notes.txt").write_text("a user's notes\n")
    return tmp_path, torch.from_numpy(np.asarray(original).copy()).permute(2, 0, 1)


def test_real_formats_decode_to_rgb(bad_tree):
    root, original = bad_tree
    good = root / "train" / "good"
    for name, tolerance in [("plain.JPEG", 0), ("png_named.JPEG", 0), ("cmyk.JPEG", 3)]:
        image = decode_image_file(good / name)
        assert image.shape == original.shape and image.dtype == torch.uint8
        assert (image.float() - original.float()).abs().mean() <= tolerance + 1e-6, name
    grey = decode_image_file(good / "grey.JPEG")
    assert grey.shape == original.shape
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    luma = (original.float() * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    assert (grey[0].float() - luma).abs().mean() < 3


def test_bad_files_are_skipped_with_one_warning_each(bad_tree):
    root, _ = bad_tree
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = FolderImages(root / "train")
    messages = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert any("zero.JPEG" in m and "0 bytes" in m for m in messages)
    assert any("notes.txt" in m for m in messages)
    assert any("empty: empty class folder" in m for m in messages)
    assert any("skipped 2 of" in m for m in messages)
    assert train.class_ids == ["bad", "empty", "good"] and len(train) == 6

    loader = build_loader(train, 4, train=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader) + list(loader)  # two epochs: still one warning per file
    decoded = sum(len(labels) for _, labels in batches)
    assert decoded == 2 * 4 and all(label == 2 for _, labels in batches for label in labels)
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, BadImageWarning))
    assert len(messages) == 2
    assert "text.JPEG" in messages[0] and "truncated.JPEG" in messages[1]


def test_strict_names_the_bad_file(bad_tree):
    root, _ = bad_tree
    with pytest.raises(DataError, match=r"notes\.txt.*strict"):
        FolderImages(root / "train", strict=True)
    (root / "train" / "bad" / "notes.txt").unlink()
    (root / "train" / "bad" / "zero.JPEG").unlink()
    with pytest.warns(BadImageWarning, match="empty class folder"):
        strict = FolderImages(root / "train", strict=True)
    with pytest.raises(DataError, match=r"text\.JPEG"):
        [strict[i] for i in range(len(strict))]


def test_files_beside_the_class_folders_are_warned_of(tmp_path, imagenette_root):
    """An unextracted class archive (ImageNet's train tar holds one per class) or an image
    outside every class folder would be left out unnoticed."""
    photo = sorted((imagenette_root / "train" / "n01440764").iterdir())[0]
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        shutil.copy(photo, tmp_path / "train" / name / "1.JPEG")
    (tmp_path / "train" / "n0123.tar").write_bytes(b"a class's images")
    shutil.copy(photo, tmp_path / "train" / "stray.JPEG")
    (tmp_path / "train" / "synset_words.txt").write_text("a apples\nb bananas\n")  # read
    with pytest.warns(BadImageWarning, match=r"2 file\(s\) beside its class folders are not "
                      r"read \(n0123.tar, stray.JPEG\).*extract n0123.tar into its class"):
        assert FolderImages(tmp_path / "train").classes == ["apples", "bananas"]


def test_skipped_counts_the_image_files_left_out_when_listed(bad_tree, tmp_path_factory):
    """An evaluation's or statistics' count of skipped images includes the empty image files
    the listing left out, beside the undecodable ones; a notes.txt is no image. Removing one
    changes the folder's fingerprint (cached statistics count it)."""
    root, _ = bad_tree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        val = FolderImages(root / "val")
        result = evaluate(create_model("resnet20", num_classes=3), val)
        stats = compute_stats(val, 16, progress=False)
        assert val.skipped_at_listing == 1  # zero.JPEG
        assert (result["images"], result["skipped"]) == (4, 3)  # text.JPEG, truncated.JPEG
        assert (stats.images, stats.skipped) == (4, 3)
        # Packed, the same counts: the pack's index remembers the image files it left out.
        packed = tmp_path_factory.mktemp("shards")
        pack_folder(root, packed, progress=False)
        shards = ShardImages(packed, "val", shuffle=False)
        result = evaluate(create_model("resnet20", num_classes=3), packed)  # its val split
        stats = compute_stats(shards, 16, progress=False)
        assert shards.skipped_at_listing == 1
        with pytest.raises(DataError, match=r"its pack left out 1 empty image file\(s\) of val "
                                            r"\(strict mode"):
            ShardImages(packed, "val", strict=True)  # as FolderImages(strict=True) refuses it
        assert (result["images"], result["skipped"]) == (4, 3)
        assert (stats.images, stats.skipped) == (4, 3)
        (root / "val" / "bad" / "zero.JPEG").unlink()
        assert FolderImages(root / "val").fingerprint() != val.fingerprint()


def test_a_pack_that_did_not_record_its_skipped_images_says_so(bad_tree, tmp_path_factory):
    """An earlier canon's index has no skipped_images: where its split skipped no file at all
    the count is 0 all the same; where it skipped some, it cannot tell how many were images,
    and says so (a strict read refuses it) rather than report a count that may be short."""
    root, _ = bad_tree
    packed = tmp_path_factory.mktemp("shards")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        pack_folder(root, packed, progress=False)
    index = json.loads((packed / "index.json").read_text())
    for split in index["splits"].values():
        del split["skipped_images"]
    index["splits"]["train"]["skipped"] = 0
    (packed / "index.json").write_text(json.dumps(index))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ShardImages(packed, "train", strict=True).skipped_at_listing == 0
    with pytest.warns(BadImageWarning, match=r"packed by an earlier canon, which did not record "
                      r"how many of the 2 file\(s\) of val it left out were images: .*re-pack "
                      rf"it with `canon pack {root} --out {packed} --splits val "
                      rf"--shard-size {index['shard_bytes']}`"):
        assert ShardImages(packed, "val").skipped_at_listing == 0
    with pytest.raises(DataError, match=r"of val it left out were images \(strict mode: re-pack"):
        ShardImages(packed, "val", strict=True)


def test_bad_folder_trains_through_build_datasets(bad_tree, tmp_path_factory):
    root, _ = bad_tree
    config = DataConfig(dataset=str(root), augmentation="resnet", crop_size=96, resize_size=112,
                        scale_range=(112, 140), mean="channel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        train = build_datasets(config, root_cache=tmp_path_factory.mktemp("cache")).train
        images, labels = next(iter(build_loader(train, 8, train=True, drop_last=False)))
    assert images.shape == (4, 3, 96, 96) and labels.tolist() == [2, 2, 2, 2]


def test_unknown_dataset_name_says_what_a_folder_must_hold():
    with pytest.raises(DataError, match="neither sample, cifar10, cifar100") as caught:
        open_dataset("imagenet-not-here")
    message = str(caught.value)
    assert "imagenet-not-here/train/<class>/*.JPEG" in message
    assert "imagenet-not-here/val/<class>/*.JPEG" in message
    assert "cifar-10-batches-py" in message


def test_decode_errors_give_the_reason(bad_tree, tmp_path):
    root, _ = bad_tree
    bad = root / "train" / "bad"
    with pytest.raises(DataError, match=r"text\.JPEG: not a recognised image format") as caught:
        decode_image_file(bad / "text.JPEG")
    assert "BytesIO" not in str(caught.value)
    with pytest.raises(DataError, match=r"truncated\.JPEG: truncated \(image file is truncated"):
        decode_image_file(bad / "truncated.JPEG")
    png = (root / "train" / "good" / "png_named.JPEG").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(DataError, match=r"cut\.png: truncated"):
        decode_image_file(tmp_path / "cut.png")


# ---------------------------------------------------------------------------------------------
# 16-bit images and decompression bombs


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG file by the specification (PIL cannot write 16-bit RGB): `rows` are the raw
    scanlines, each already prefixed with its filter byte."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + checksum

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_format_is_turned_upright_by_its_exif_orientation(orientation, tmp_path):
    """torchvision turns JPEGs and PNGs, not WebPs; canon turns them all, PNG as the
    reference (lossless, as the WebP here)."""
    pixels = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3) * 2
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = {}
    for suffix, options in ((".png", {}), (".webp", {"lossless": True})):
        path = tmp_path / f"image{suffix}"
        Image.fromarray(pixels).save(path, exif=exif.tobytes(), **options)
        decoded[suffix] = decode_image_file(path)
    assert decoded[".png"].shape[1:] == ((5, 7) if orientation < 5 else (7, 5))
    assert torch.equal(decoded[".webp"], decoded[".png"])
    with Image.open(tmp_path / "image.png") as image:
        upright = np.array(ImageOps.exif_transpose(image).convert("RGB"))
    assert torch.equal(decoded[".png"], torch.from_numpy(upright).permute(2, 0, 1))


def test_a_png_libpng_rejects_mid_image_is_an_error_not_a_crash(tmp_path):
    """A row with filter byte 5 (there are 0-4), the checksums right: torchvision's libpng
    decoder ends the process with a segmentation fault on it, so PNGs go to PIL."""
    rows = b"".join(b"\x05" + bytes(12) for _ in range(4))
    (tmp_path / "bad filter.png").write_bytes(_png(4, 4, 8, 2, rows))
    code = ("from canon.data.decoding import decode_image_file\n"
            "from canon.errors import DataError\n"
            "try:\n    decode_image_file('bad filter.png')\n"
            "except DataError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-500:]}"
    assert done.stdout.startswith("bad filter.png: corrupt image")


def test_16_bit_images_decode_to_8_bit(tmp_path):
    generator = np.random.default_rng(0)
    rgb = generator.integers(0, 65536, (6, 6, 3), dtype=np.uint16)
    rgb[0, 0] = (0, 255, 65535)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)
    (tmp_path / "rgb16.png").write_bytes(_png(6, 6, 16, 2, rows))  # colour type 2: RGB
    grey = generator.integers(0, 65536, (7, 9), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")  # PIL mode I;16
    Image.fromarray(grey).save(tmp_path / "grey16.tif")  # decoded by PIL, not torchvision
    Image.fromarray(grey).save(tmp_path / "grey16.pgm")  # PIL mode I (32-bit)
    expected = {"rgb16.png": rgb >> 8, "grey16.png": np.repeat(grey[..., None] >> 8, 3, 2),
                "grey16.tif": np.repeat(grey[..., None] >> 8, 3, 2),
                "grey16.pgm": np.repeat(grey[..., None] >> 8, 3, 2)}
    for name, high_bytes in expected.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's of a read-only array, once a process
            image = decode_image_file(tmp_path / name)
        assert image.dtype == torch.uint8, name
        assert image.permute(1, 2, 0).numpy().tolist() == high_bytes.tolist(), name
    assert decode_image_file(tmp_path / "rgb16.png")[:, 0, 0].tolist() == [0, 0, 255]
    Image.fromarray(grey.astype(np.float32) / 65535).save(tmp_path / "float.tif")  # mode F
    with pytest.raises(DataError, match=r"float\.tif: a floating-point image \(PIL mode F\)"):
        decode_image_file(tmp_path / "float.tif")  # was clipped to a black picture

    for label in ("a", "b"):  # statistics of a folder of them (they crashed on uint16)
        (tmp_path / "tree" / label).mkdir(parents=True)
        (tmp_path / "tree" / label / "x.png").write_bytes((tmp_path / "rgb16.png").read_bytes())
    stats = compute_stats(FolderImages(tmp_path / "tree"), 6, progress=False)
    assert torch.allclose(stats.channel_mean.double(),
                          torch.from_numpy((rgb >> 8).mean((0, 1)) / 255), atol=1e-6)


def test_an_animated_gif_decodes_its_first_frame_alone(tmp_path, monkeypatch):
    """Its header gives one frame's size, which the pixel limit checks: torchvision would
    decode all of them (1,000 frames of 4000 x 4000 pass a limit of 179 million pixels)."""
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((200, 0, 0), (0, 200, 0))]
    frames[0].save(tmp_path / "two.gif", save_all=True, append_images=frames[1:])

    def every_frame(data: bytes) -> None:
        raise AssertionError("torchvision decoded the GIF")

    monkeypatch.setattr("canon.data.decoding._decode_with_torchvision", every_frame)
    image = decode_image_file(tmp_path / "two.gif")
    assert image.shape == (3, 30, 40) and image[:, 0, 0].tolist() == [200, 0, 0]


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A real 20000 x 20000 1-bit PNG: 48 KB on disk, 1.2 GB once decoded to RGB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(_png(20000, 20000, 1, 0, bytes(1 + 20000 // 8) * 20000))
    return path


def test_decompression_bombs_are_refused_from_the_header(bomb, tmp_path):
    assert bomb.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"bomb\.png: 20000 x 20000 = 400,000,000 pixels, over "
                       r"the limit of 178,956,970 \(data\.max_image_pixels"):
        decode_image_file(bomb)
    # 0: no limit of canon's own, but PIL's (2 x Image.MAX_IMAGE_PIXELS) holds, as it did when
    # PIL read every header.
    with pytest.raises(DataError, match=r"bomb\.png: too large to decode \(20000 x 20000 .* "
                       r"over PIL's limit of 178,956,970"):
        decode_image_file(bomb, max_pixels=0)
    Image.new("RGB", (300, 200), (10, 20, 30)).save(tmp_path / "modest.png")
    with pytest.raises(DataError, match=r"300 x 200 = 60,000 pixels, over the limit of 50,000"):
        decode_image_file(tmp_path / "modest.png", max_pixels=50_000)
    for limit in (60_000, 0):  # 0: no limit of canon's own
        assert decode_image_file(tmp_path / "modest.png", limit).shape == (3, 200, 300)
    assert DataConfig().max_image_pixels == 2 * Image.MAX_IMAGE_PIXELS  # PIL's refusal
    with pytest.raises(ConfigError, match=r"data\.max_image_pixels must be an integer >= 0"):
        DataConfig(max_image_pixels=-1)


def test_a_folder_skips_too_large_images(bomb, tmp_path):
    for split in ("train", "val"):
        for label, size in (("big", (300, 200)), ("small", (30, 20))):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", size).save(tmp_path / split / label / "x.png")
    (tmp_path / "train" / "big" / "bomb.png").symlink_to(bomb)
    train, _ = open_dataset(str(tmp_path), max_pixels=50_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [train[i] for _ in range(2) for i in range(len(train))]
    assert [item[1] for item in items if item is not None] == [1, 1]
    messages = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(messages) == 2  # one per file, not per read
    assert "bomb.png: 20000 x 20000 = 400,000,000 pixels, over the limit of 50,000" in messages[0]
    assert "big/x.png: 300 x 200 = 60,000 pixels, over the limit of 50,000" in messages[1]
    strict = FolderImages(tmp_path / "train", strict=True, max_pixels=50_000)
    with pytest.raises(DataError, match=r"300 x 200 .*strict mode"):
        strict.load_image(strict.paths.index(tmp_path / "train" / "big" / "x.png"))


# ---------------------------------------------------------------------------------------------
# image_size: the header check's fast path, against PIL


def test_image_size_of_real_jpegs_matches_pil(imagenette_root):
    paths = sorted(imagenette_root.rglob("*.JPEG"))
    assert len(paths) == 1500
    for path in paths:
        data = path.read_bytes()
        assert image_size(data) == Image.open(io.BytesIO(data)).size, path


def _pil_files(tmp_path: Path) -> list[Path]:
    """JPEG, PNG and WebP files in the modes PIL writes them, each of a different size."""
    progressive, lossy, lossless = {"progressive": True}, {"quality": 80}, {"lossless": True}
    cases = [  # (mode, file name suffix, save options)
        *[(mode, "jpg", {}) for mode in ("RGB", "L", "CMYK")],
        *[(mode, "progressive.jpg", progressive) for mode in ("RGB", "L", "CMYK")],
        *[(mode, "png", {}) for mode in ("RGB", "L", "RGBA", "P")],
        *[(mode, "webp", lossy) for mode in ("RGB", "RGBA")],  # RGBA: VP8X, ALPH, VP8
        *[(mode, "lossless.webp", lossless) for mode in ("RGB", "RGBA")],
        ("RGB", "icc.webp", {"icc_profile": b"profile"}),  # VP8X, ICCP, VP8
    ]
    generator = np.random.default_rng(0)
    paths = []
    for i, (mode, suffix, options) in enumerate(cases):
        width, height = 37 + 13 * i, 23 + 7 * i
        pixels = generator.integers(0, 256, (height, width, 4), dtype=np.uint8)
        paths.append(tmp_path / f"{i}_{mode}.{suffix}")
        Image.fromarray(pixels, "RGBA").convert(mode).save(paths[-1], **options)
    paths.append(tmp_path / "wide.png")  # wider than JPEG's and WebP's fields hold
    Image.new("1", (70000, 3)).save(paths[-1])
    return paths


def test_image_size_of_pil_written_files_matches_pil(tmp_path):
    paths = _pil_files(tmp_path)
    chunks = set()
    for path in paths:
        data = path.read_bytes()
        chunks.add(data[12:16] if path.suffix == ".webp" else b"")
        assert image_size(data) == Image.open(path).size, path.name
    assert chunks == {b"", b"VP8 ", b"VP8L", b"VP8X"}  # WebP's three kinds of first chunk


def test_image_size_walks_fill_bytes_and_standalone_markers(imagenette_root):
    data = sorted(imagenette_root.rglob("*.JPEG"))[0].read_bytes()
    # SOI, then fill bytes, RST0 and TEM (no length fields) before the first segment.
    padded = data[:2] + b"\xff\xff\xff\xd0\xff\x01" + data[2:]
    assert image_size(padded) == Image.open(io.BytesIO(data)).size


def test_jpeg_and_webp_decode_without_a_pil_object(tmp_path, monkeypatch):
    paths = [path for path in _pil_files(tmp_path)  # PIL decodes CMYK JPEGs and PNGs
             if "CMYK" not in path.name and path.suffix != ".png"]
    expected = {path: decode_image_file(path) for path in paths}
    monkeypatch.setattr(Image, "open", None)  # the ~60 us header read the fast path avoids
    for path in paths:
        assert torch.equal(decode_image_file(path), expected[path]), path.name


def test_image_size_of_bad_headers_is_none_and_they_decode_as_bad(tmp_path, imagenette_root):
    jpeg = sorted(imagenette_root.rglob("*.JPEG"))[0].read_bytes()
    Image.new("RGB", (8, 6)).save(tmp_path / "good.png")
    png = (tmp_path / "good.png").read_bytes()
    frame = jpeg.index(b"\xff\xc0")
    bad = {
        "empty": b"", "text": b"not an image\n", "soi only": jpeg[:2], "png signature": png[:8],
        "jpeg cut in its frame header": jpeg[: frame + 6], "png cut in IHDR": png[:20],
        "zero-length segment": jpeg[:2] + b"\xff\xe0\x00\x00" + jpeg[2:],
        "garbage between segments": jpeg[:2] + b"\x00" + jpeg[2:],
        "scan before a frame": jpeg[:2] + b"\xff\xda\x00\x02" + jpeg[2:],
        "zero height": jpeg[: frame + 5] + b"\x00\x00" + jpeg[frame + 7 :],
        "riff, not webp": b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(20),
        "webp cut short": b"RIFF\x00\x00\x00\x00WEBPVP8X" + bytes(6),
        "webp, unknown chunk": b"RIFF\x00\x00\x00\x00WEBPABCD" + bytes(20),
        "all fill bytes": b"\xff\xd8" + b"\xff" * 100,
    }
    for name, data in bad.items():
        assert image_size(data) is None, name
    # PIL reads these headers instead and reports the files as undecodable, never crashes
    # (it reads past a zero-length APP0 segment, and decodes that one).
    for name in bad.keys() - {"empty", "zero-length segment"}:
        (tmp_path / "bad.jpg").write_bytes(bad[name])
        with pytest.raises(DataError, match=r"bad\.jpg: (not a recognised|truncated|corrupt)"):
            decode_image_file(tmp_path / "bad.jpg")


# ---------------------------------------------------------------------------------------------
# Layouts: split names, Tiny-ImageNet, what an unreadable layout says


def _write_images(folder: Path, count: int, suffix: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 6), (i * 40, 0, 0)).save(folder / f"img{i}{suffix}")


@pytest.mark.parametrize("val_name", ["validation", "valid", "test"])
def test_evaluation_split_names(tmp_path, val_name):
    for split in ("train", val_name, "val_"):
        for label in ("apple", "pear"):
            _write_images(tmp_path / split / label, 2)
    _, val = open_dataset(str(tmp_path))
    assert val.root == tmp_path / val_name and val.labels == [0, 0, 1, 1]
    (tmp_path / "val_").rename(tmp_path / "val")  # val/ is preferred
    assert open_eval_split(str(tmp_path)).root == tmp_path / "val"


def test_tiny_imagenet_layout(tmp_path):
    wnids = ["n01443537", "n01629819"]
    for wnid in wnids:
        _write_images(tmp_path / "train" / wnid / "images", 3, ".JPEG")
        (tmp_path / "train" / wnid / f"{wnid}_boxes.txt").write_text("img0.JPEG\t0\t0\t8\t6\n")
    _write_images(tmp_path / "val" / "images", 4, ".JPEG")
    _write_images(tmp_path / "test" / "images", 2, ".JPEG")  # unlabelled: never read
    (tmp_path / "val" / "val_annotations.txt").write_text(
        "img0.JPEG\tn01629819\t0\t0\t8\t6\nimg1.JPEG\tn01443537\t0\t0\t8\t6\n"
        "img2.JPEG\tn01629819\t0\t0\t8\t6\nimg3.JPEG\tn01443537\t0\t0\t8\t6\n"
    )
    (tmp_path / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\n"
                                        "n01629819\tEuropean fire salamander\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadImageWarning)  # the boxes files are not images
        train, val = open_dataset(str(tmp_path))
    assert train.class_ids == val.class_ids == wnids
    assert train.classes == ["goldfish", "European fire salamander"]
    assert len(train) == 6 and train.labels == [0, 0, 0, 1, 1, 1]
    assert [(p.name, label) for p, label in zip(val.paths, val.labels, strict=True)] == [
        ("img1.JPEG", 0), ("img3.JPEG", 0), ("img0.JPEG", 1), ("img2.JPEG", 1)]
    assert val[0][0].shape == (3, 6, 8)


def _scanned_with_warnings(root: Path) -> tuple[FolderImages, str]:
    """The folder as scanned, and the text of every BadImageWarning the scan gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = FolderImages(root)
    return images, " ".join(str(w.message) for w in caught
                            if issubclass(w.category, BadImageWarning))


def test_images_in_subfolders_of_a_class_are_read_and_nothing_goes_unsaid(tmp_path):
    """As torchvision's ImageFolder: a class folder's subfolders are read. A link to nothing
    and a linked folder are skipped with a warning naming them."""
    _write_images(tmp_path / "a", 1)
    _write_images(tmp_path / "a" / "sub", 2)
    (tmp_path / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    _write_images(tmp_path / "b" / "images", 1)  # not Tiny-ImageNet: a file beside images/
    _write_images(tmp_path / "b", 1, ".JPEG")
    _write_images(tmp_path / "c" / "deeper" / "still", 1)
    (tmp_path / "c" / "loop").symlink_to(tmp_path / "c", target_is_directory=True)
    images, named = _scanned_with_warnings(tmp_path)
    assert f"{tmp_path / 'a' / 'gone.png'}: a link to nothing" in named
    assert f"{tmp_path / 'c' / 'loop'}: a link to a folder" in named
    assert [str(p.relative_to(tmp_path)) for p in images.paths] == [
        "a/img0.png", "a/sub/img0.png", "a/sub/img1.png", "b/images/img0.png", "b/img0.JPEG",
        "c/deeper/still/img0.png"]
    assert images.labels == [0, 0, 0, 1, 1, 2]


def test_an_unreadable_folder_and_a_file_removed_during_the_scan_are_skipped_by_name(
    tmp_path, monkeypatch
):
    """What the scan meets on a live file system goes through the skip rules, as a bad file
    does, not out as a bare OSError. Tests run as root here, so a folder without read
    permission is simulated; the removal is a real one, between listing and stat."""
    _write_images(tmp_path / "a", 2)
    _write_images(tmp_path / "a" / "locked", 1)
    _write_images(tmp_path / "b", 2)
    scandir, unreadable = os.scandir, {"locked"}

    def live_scandir(folder):
        if Path(folder).name in unreadable:
            raise PermissionError(13, "Permission denied", str(folder))
        entries = list(scandir(folder))
        if Path(folder).name == "a":
            (Path(folder) / "img1.png").unlink(missing_ok=True)
        unstatable = Path(folder).name == "b"
        return [_Unstatable(e) if unstatable and e.name == "img1.png" else e for e in entries]

    monkeypatch.setattr(os, "scandir", live_scandir)
    images, named = _scanned_with_warnings(tmp_path)
    assert f"{tmp_path / 'a' / 'locked'}: cannot read the folder (Permission denied)" in named
    assert f"{tmp_path / 'a' / 'img1.png'}: removed while the folder was read" in named
    assert f"{tmp_path / 'b' / 'img1.png'}: cannot read (Permission denied)" in named
    assert [str(p.relative_to(tmp_path)) for p in images.paths] == ["a/img0.png", "b/img0.png"]
    with pytest.raises(DataError, match=r"locked: cannot read the folder .*strict mode"):
        FolderImages(tmp_path, strict=True)
    unreadable |= {"a", "b"}  # no image at all: the error says what it could see, not OSError
    with pytest.raises(DataError, match=r"a holds nothing canon can read \(Permission denied"):
        _scanned_with_warnings(tmp_path)


class _Unstatable:
    """A directory entry whose stat fails as a file without search permission on its folder
    does for other users."""

    def __init__(self, entry: os.DirEntry) -> None:
        self.name, self.path = entry.name, entry.path

    def is_dir(self) -> bool:
        return False

    def is_file(self) -> bool:
        return True

    def stat(self) -> os.stat_result:
        raise PermissionError(13, "Permission denied", self.path)


def test_a_file_rewritten_at_the_same_size_changes_the_folder_fingerprint(tmp_path):
    """The fingerprint keys cached statistics: an image replaced by another of the same size
    (a new modification time) must not find the old statistics."""
    _write_images(tmp_path / "a", 1)
    _write_images(tmp_path / "b", 1)
    before = FolderImages(tmp_path).fingerprint()
    assert FolderImages(tmp_path).fingerprint() == before
    image = tmp_path / "a" / "img0.png"
    size, modified = image.stat().st_size, image.stat().st_mtime_ns
    image.write_bytes(image.read_bytes()[::-1])
    os.utime(image, ns=(modified, modified + 10**9))
    assert image.stat().st_size == size and FolderImages(tmp_path).fingerprint() != before
    # A file name that is not UTF-8 (Latin-1 bytes, as old archives hold) is read as any other,
    # and an empty one is skipped by it
    latin1 = os.fsdecode(b"caf\xe9.png")
    shutil.copy(image, tmp_path / "a" / latin1)
    (tmp_path / "b" / os.fsdecode(b"vid\xe9.png")).touch()
    with pytest.warns(BadImageWarning) as caught:  # the file's, then the folder's count
        folder = FolderImages(tmp_path)
    assert [str(w.message).split(": ")[-1] for w in caught] == [
        "empty file (0 bytes)", "skipped 1 of 4 files (see the warnings above)"]
    assert latin1 in {p.name for p in folder.paths} and len(folder) == 3


def test_statistics_under_another_pixel_limit_are_cached_apart(tmp_path):
    """Images over data.max_image_pixels are skipped as they are decoded, so statistics
    computed under one limit are not those of the images another limit lets through."""
    _write_images(tmp_path / "a", 1)
    _write_images(tmp_path / "b", 1)
    default, limited = FolderImages(tmp_path), FolderImages(tmp_path, max_pixels=30)
    assert stats_cache_path(limited, 32) != stats_cache_path(default, 32)
    assert stats_cache_path(default, 32).name.startswith(default.fingerprint())


def test_pgm_and_jfif_files_are_images_as_imagefolder_and_browsers_have_them(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        Image.new("L", (8, 6), 90).save(tmp_path / label / "grey.pgm")
        Image.new("RGB", (8, 6), (9, 9, 9)).save(tmp_path / label / "saved.jfif", "JPEG")
    folder = FolderImages(tmp_path)
    assert sorted(p.name for p in folder.paths) == ["grey.pgm", "grey.pgm", "saved.jfif",
                                                    "saved.jfif"]
    assert folder[0][0].shape == (3, 6, 8)


def test_an_image_folder_may_hold_an_index_json_of_its_own(tmp_path):
    for split in ("train", "val"):
        for label in ("apple", "pear"):
            _write_images(tmp_path / split / label, 2)
    (tmp_path / "index.json").write_text('{"labelled by": "someone"}')
    with tarfile.open(tmp_path / "originals.tar", "w") as archive:  # and its images' archive
        archive.add(tmp_path / "train", arcname="train")
    train, val = open_dataset(str(tmp_path))
    assert (len(train), len(val)) == (4, 4)


def test_unreadable_layouts_say_what_was_found(tmp_path):
    for split in ("train", "val"):  # images without class folders
        _write_images(tmp_path / "flat" / split, 2)
    with pytest.raises(DataError, match=r"train: no class folders \(it holds 2 file\(s\): "
                                        r"img0\.png, img1\.png; 0 folder\(s\): none\); "
                                        r"expected .*train/<class>/<image files>"):
        open_dataset(str(tmp_path / "flat"))
    for label in ("a", "b"):  # class folders holding only folders without images
        for split in ("train", "val"):
            (tmp_path / "deep" / split / label / "photos").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no image files \(.*train/a holds 0 file\(s\): none; "
                                        r"1 folder\(s\): photos/\); expected .*<class>/images/"), \
            pytest.warns(BadImageWarning, match="empty class folder"):
        open_dataset(str(tmp_path / "deep"))
    (tmp_path / "no_val" / "train").mkdir(parents=True)
    (tmp_path / "no_val" / "readme.txt").write_text("")
    with pytest.raises(DataError, match=r"no val/validation/valid/test folder \(it holds 1 "
                                        r"file\(s\): readme\.txt; 1 folder\(s\): train/\).*"
                                        r"or train on train/ alone, holding data\.val_split=N"):
        open_dataset(str(tmp_path / "no_val"))
    for label in ("a", "b"):  # a split folder given for the dataset's: its parent named
        _write_images(tmp_path / "data" / "train" / label, 1)
        _write_images(tmp_path / "data" / "val" / label, 1)
    with pytest.raises(DataError, match=r"data/train is itself the train/ split of .*data: "
                                        "give that folder"):
        open_dataset(str(tmp_path / "data" / "train"))


def test_statistics_need_the_training_split_alone(tmp_path):
    """A folder without val/ trains with data.val_split, so canon stats reads it too."""
    for label in ("apple", "pear"):
        _write_images(tmp_path / "fruit" / "train" / label, 2)
    stats, path = statistics_of(str(tmp_path / "fruit"), size=4, cache=tmp_path / "cache",
                                progress=False)
    assert stats.images == 4 and path.is_file()


def test_one_class_is_refused(tmp_path):
    for split in ("train", "val"):
        _write_images(tmp_path / split / "cat", 2)
    with pytest.raises(DataError, match=r"train: found 1 class folder \(cat\); classification "
                                        "needs at least two"):
        open_dataset(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The evaluation split alone, labelled by a model's classes


def test_eval_split_of_a_folder_is_labelled_by_the_models_classes(tmp_path):
    model_classes = ["n01", "n02", "n03"]
    for label in ("n01", "n03"):  # a subset of the model's classes; no train/ beside it
        _write_images(tmp_path / "val" / label, 2)
    for root in (tmp_path, tmp_path / "val"):  # the dataset root, or the split itself
        val = open_eval_split(str(root), model_classes)
        assert val.root == tmp_path / "val"
        assert val.labels == [0, 0, 2, 2] and val.class_ids == val.classes == model_classes
    assert open_eval_split(str(tmp_path)).labels == [0, 0, 1, 1]  # its own classes
    _write_images(tmp_path / "val" / "n99", 1)
    with pytest.raises(DataError, match=r"val: class\(es\) n99 are not among the 3 "
                                        r"classes it is scored against \(n01, n02, n03: .*; "
                                        r"keep only those classes in it"):
        open_eval_split(str(tmp_path), model_classes)
    with pytest.raises(DataError, match=r"it shares none of them: is it the dataset the model "
                                        r"was trained for\?"):  # another dataset altogether
        open_eval_split(str(tmp_path), ["cat", "dog"])
    (tmp_path / "train").mkdir()
    (tmp_path / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(DataError, match="no val/validation/valid/test folder"):
        open_eval_split(str(tmp_path), model_classes)


def test_eval_split_of_arrays_is_matched_by_class_name():
    test = load_sample("test")
    assert test.class_ids == test.classes == CIFAR10_CLASSES
    reordered = open_eval_split("sample", [*CIFAR10_CLASSES[::-1], "unicorn"])
    assert reordered.labels == [9 - label for label in test.labels]
    assert reordered.classes[-1] == "unicorn" and torch.equal(reordered.images, test.images)
    assert open_eval_split("sample", CIFAR10_CLASSES).labels == test.labels
    with pytest.raises(DataError, match=r"sample-test: class\(es\) airplane, automobile, bird"):
        open_eval_split("sample", ["cat", "dog"])
