"""Datasets on real files: CIFAR pickles, ImageNet-layout JPEG trees, the bundled sample, and a
folder of the bad files real datasets contain."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from canon.data import BadImageWarning, DataConfig, build_datasets, build_loader
from canon.data.datasets import (
    CIFAR,
    FolderImages,
    decode_image_file,
    download_and_verify,
    extract_tar,
    fetch_cifar,
    load_sample,
    open_dataset,
    read_cifar,
)
from canon.errors import DataError

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

    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": Evil()}))
    with pytest.raises(DataError, match=r"batches\.meta"):
        read_cifar("cifar10", folder, "test")


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
    with pytest.raises(DataError, match="cannot download"):
        download_and_verify(payload.as_uri(), tmp_path / "other.bin", good)


def test_extract_refuses_paths_outside(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match="unsafe"):
        extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_missing_cifar_without_download_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"data\.download"):
        fetch_cifar("cifar10", tmp_path, download=False)
    assert CIFAR["cifar10"]["md5"] == "c58f30108f718f92721af3b95e74349a"


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
    assert any(m.endswith("empty: empty class folder") for m in messages)
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


def test_bad_folder_trains_through_build_datasets(bad_tree, tmp_path_factory):
    root, _ = bad_tree
    config = DataConfig(dataset=str(root), augmentation="resnet", crop_size=96, resize_size=112,
                        scale_range=(112, 140), mean="channel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        train, _ = build_datasets(config, root_cache=tmp_path_factory.mktemp("cache"))
        images, labels = next(iter(build_loader(train, 8, train=True, drop_last=False)))
    assert images.shape == (4, 3, 96, 96) and labels.tolist() == [2, 2, 2, 2]


def test_unknown_dataset_name_says_what_a_folder_must_hold():
    with pytest.raises(DataError, match="neither sample, cifar10, cifar100") as caught:
        open_dataset("imagenet-not-here")
    message = str(caught.value)
    assert "imagenet-not-here/train/<class>/*.JPEG" in message
    assert "imagenet-not-here/val/<class>/*.JPEG" in message
    assert "cifar-10-batches-py" in message
