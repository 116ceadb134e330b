"""canon.data.device_jpeg (issue 14): on-device decoding and augmentation, run here on the CPU
tensor path: a batch decodes to exactly canon's own decoder's pixels (a PNG named .JPEG among
them too), the crops are the per-image pipeline's, resampled alike (the same pixels on the
CPU), only pipelines with an on-device form get one, and a run
with train.decode_on_device trains on real JPEGs."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from canon.data.config import DataConfig
from canon.data.decoding import decode_image_file
from canon.data.device_jpeg import (
    DeviceCrops,
    DeviceDecodedBatches,
    FileBytes,
    _plain_jpeg,
    collate_files,
    decode_batch,
)
from canon.data.folders import FolderImages
from canon.data.loaders import build_datasets
from canon.data.sampling import SeededSamples
from canon.data.transforms import Compose, FancyPCA, RandomAreaCrop, ToFloat
from canon.engine.trainer import train
from canon.recipes import load_recipe

CPU = torch.device("cpu")
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                              reason="needs a CUDA device")]


def _recipe_train(name: str, root: Path, **changes):
    data = dataclasses.replace(load_recipe(name).data, dataset=str(root), **changes)
    return build_datasets(data).train


def _batch(folder: FolderImages, indices: list[int]):
    """(keys, files, labels) of images `indices`, as the loader hands them over."""
    keys, data, lengths, labels = collate_files([FileBytes(folder)[i] for i in indices])
    return keys, list(torch.split(data, lengths.tolist())), labels


def test_a_batch_decodes_to_canons_pixels_with_a_png_and_an_exif_rotation_among_the_jpegs(
    imagenette_root: Path, tmp_path: Path
) -> None:
    for wnid in ("n01440764", "n02102040"):
        folder = tmp_path / wnid
        folder.mkdir()
        originals = sorted((imagenette_root / "train" / wnid).iterdir())[:3]
        for path in originals:
            shutil.copy(path, folder / path.name)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    Image.open(originals[1]).save(folder / "zy_rotated.JPEG", exif=exif)
    Image.open(originals[0]).save(folder / "zz_png_named.JPEG", format="PNG")
    images = FolderImages(tmp_path)
    keys, files, labels = _batch(images, list(range(len(images))))
    assert labels.tolist() == images.labels
    assert images.paths[6].name == "zy_rotated.JPEG"
    assert decode_image_file(images.paths[6]).shape[1:] == decode_image_file(
        originals[1]).shape[:0:-1]  # canon's decoder turns it upright
    for count in (6, 7, 8):  # plain JPEGs: one decode_jpeg call; the others: canon's decoder
        decoded = decode_batch(files[:count], keys, images, CPU)
        for i, image in enumerate(decoded):
            assert torch.equal(image, decode_image_file(images.paths[i]))
    assert _plain_jpeg(files[0], 0) and not _plain_jpeg(files[0][: len(files[0]) // 2], 0)
    (tmp_path / "n02102040" / "zz_png_named.JPEG").write_bytes(files[0][:300].numpy().tobytes())
    with pytest.warns(UserWarning, match="zz_png_named.JPEG"):  # now a truncated JPEG
        truncated = FolderImages(tmp_path)
        keys, files, _ = _batch(truncated, [0, 7])
        decoded = decode_batch(files, keys, truncated, CPU)
        assert decoded[1] is None and torch.equal(decoded[0], truncated.load_image(0))


def test_only_pipelines_with_an_on_device_form_get_one(imagenette_root: Path) -> None:
    def device_form(name: str, **changes):
        return DeviceCrops.of(_recipe_train(name, imagenette_root, **changes).transform)

    assert device_form("resnet18-imagenette5") is not None  # random area crops, channel mean
    assert device_form("resnet50-goyal") is not None
    assert device_form("resnet18", mean="imagenet") is not None  # scale augmentation + PCA
    assert device_form("resnet18") is None  # its per-pixel mean image
    assert device_form("googlenet", mean="imagenet") is None  # photometric, random filters
    assert device_form("alexnet", mean="imagenet") is None  # crops of a fixed square
    assert DeviceCrops.of(Compose([RandomAreaCrop(64), ToFloat()])) is None  # no Normalize


def test_the_normalisation_constants_go_to_the_device_once(monkeypatch) -> None:
    """As the batched CIFAR crops: a copy from host memory every batch would make the host
    wait for the GPU's queue; on the CPU the cache shows as one copy of the colour basis."""
    pca = FancyPCA(torch.eye(3), torch.ones(3), 0.1)
    copies = []
    to = pca.to
    monkeypatch.setattr(pca, "to", lambda device: copies.append(device) or to(device))
    augment = DeviceCrops(8, None, torch.zeros(3), torch.ones(3), pca)
    first = augment._on(torch.device("cpu"))
    again = augment._on(torch.device("cpu"))
    assert all(a is b for a, b in zip(again, first, strict=True)) and len(copies) == 1


def test_cmyk_and_greyscale_jpegs_decode_to_canons_pixels(imagenette_root: Path,
                                                          tmp_path: Path) -> None:
    original = sorted((imagenette_root / "train" / "n01440764").iterdir())[0]
    for wnid, mode in (("n01440764", "CMYK"), ("n02102040", "L")):
        (tmp_path / wnid).mkdir()
        Image.open(original).convert(mode).save(tmp_path / wnid / f"{mode}.JPEG")
    images = FolderImages(tmp_path)
    keys, files, _ = _batch(images, [0, 1])
    assert [_plain_jpeg(data, 0) for data in files] == [False, True]  # CMYK: canon's decoder
    for i, image in enumerate(decode_batch(files, keys, images, CPU)):
        assert torch.equal(image, decode_image_file(images.paths[i]))


def test_a_file_gone_after_the_scan_is_skipped_with_the_reason(
    imagenette_root: Path, tmp_path: Path
) -> None:
    for wnid in ("n01440764", "n02102040"):
        (tmp_path / wnid).mkdir()
        for path in sorted((imagenette_root / "train" / wnid).iterdir())[:2]:
            shutil.copy(path, tmp_path / wnid / path.name)
    images = FolderImages(tmp_path)
    images.paths[1].unlink()
    keys, files, _ = _batch(images, [0, 1])
    assert len(files[1]) == 0  # the loader process hands over no bytes, and no error
    with pytest.warns(UserWarning, match=rf"{images.paths[1].name}: cannot read"):
        decoded = decode_batch(files, keys, images, CPU)
    assert decoded[1] is None and torch.equal(decoded[0], images.load_image(0))


@pytest.mark.parametrize(("recipe", "scales", "side", "device"), [
    ("resnet18-imagenette5", None, 96, "cpu"), ("resnet18", None, 96, "cpu"),
    ("resnet18", (100, 130), 96, "cpu"),
    ("resnet18-imagenette5", None, 40, "cpu"), ("resnet18", (56, 64), 48, "cpu"),
    pytest.param("resnet18-imagenette5", None, 96, "cuda", marks=ON_GPU),
    pytest.param("resnet18", (100, 130), 96, "cuda", marks=ON_GPU)])
def test_on_device_crops_are_the_cpu_pipelines_crops(
    imagenette_root: Path, recipe: str, scales: tuple[int, int] | None, side: int, device: str
) -> None:
    """The same boxes, colour shifts and reflections as the per-image pipeline seeded as in
    training (SeededSamples), jittered scales too, resampled by the same filter: on the CPU
    the same pixels, to the per-image path's uint8 rounding of a resized area crop, shrunk
    by up to 4 times too (a filter that averaged fewer pixels kept more of the fine detail
    there); on a GPU nvJPEG's decoding differs by a grey level here and there."""
    train_set = _recipe_train(recipe, imagenette_root, mean="imagenet", crop_size=side,
                              resize_size=side + 14, scale_range=scales, pca_std=0.1,
                              pca_source="imagenet")
    augment = DeviceCrops.of(train_set.transform)
    count, size = 48, len(train_set)
    indices = torch.linspace(0, size - 1, count).long()
    keys = 3 * size + indices  # epoch 3
    if device == "cpu":
        images = [train_set.load_image(int(i)) for i in indices]
    else:  # the files' bytes decoded together on the GPU, as DeviceDecodedBatches does
        folder = FolderImages(imagenette_root / "train")
        _, files, _ = _batch(folder, indices.tolist())
        images = decode_batch(files, keys, folder, torch.device(device))
        assert all(image.device.type == device for image in images)
    crops = augment(images, keys, 5, size)
    assert crops.shape == (count, 3, side, side) and crops.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(torch.cat([augment(images[:20], keys[:20], 5, size),
                                  augment(images[20:], keys[20:], 5, size)]), crops)
    crops = crops.cpu()
    per_image = SeededSamples(train_set, seed=5)
    reference = torch.stack([per_image[int(key)][0] for key in keys])
    difference = (crops - reference).abs()
    if device == "cpu":  # a grey level over ImageNet's std (0.225): 0.0174 (uint8 rounding)
        assert difference.max() < 0.018
    assert difference.mean() < 0.03  # normalised units: a grey level or two on average
    assert difference.flatten(1).mean(1).max() < 0.1  # no image cropped elsewhere or unflipped
    torch.testing.assert_close(crops.mean((0, 2, 3)), reference.mean((0, 2, 3)), atol=0.01,
                               rtol=0)
    torch.testing.assert_close(crops.std((0, 2, 3)), reference.std((0, 2, 3)), atol=0, rtol=0.03)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_GPU)])
def test_a_run_decoding_on_the_device_trains_on_real_jpegs(
    imagenette_root: Path, tmp_path: Path, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batches come from the device decoder, not the per-image fallback (a warning)."""
    recipe = load_recipe("resnet18-imagenette5", [
        ("data.dataset", str(imagenette_root)), ("data.crop_size", 48),
        ("data.resize_size", 56), ("train.batch_size", 32), ("train.epochs", 1),
        ("train.iterations", 1), ("train.workers", 1), ("train.decode_on_device", True),
        ("model.name", "resnet18")])
    decoded = []
    device_batches = DeviceDecodedBatches.__iter__

    def counted(self: DeviceDecodedBatches):
        for images, labels in device_batches(self):
            decoded.append(len(labels))
            yield images, labels

    monkeypatch.setattr(DeviceDecodedBatches, "__iter__", counted)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="train.decode_on_device")
        train(recipe, tmp_path / "run", device=device, progress=False)
    assert decoded == [32] * 8  # 1 iteration at the recipe's base batch of 256: 8 of 32
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 2 and "nan" not in metrics[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decoding_beside_a_queued_step_leaves_its_tensors_alone(imagenette_root, tmp_path):
    """ResNet-50 at batch 256 on the GPU, each batch decoded while the previous step's kernels
    are queued: with nvJPEG writing into blocks they still read (pytorch/vision#9606) its
    loss was NaN by the third step on an H200, where decoding on the CPU trained on."""
    recipe = load_recipe("resnet18-imagenette5", [
        ("data.dataset", str(imagenette_root)), ("model.name", "resnet50_v1_5"),
        ("data.crop_size", 224), ("data.resize_size", 256), ("train.batch_size", 256),
        ("train.epochs", 3), ("train.amp", "bf16"), ("optimizer.lr", 0.1),
        ("train.workers", 4), ("train.decode_on_device", True)])
    train(recipe, tmp_path / "run", device="cuda", progress=False)  # NonFiniteError on NaN
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 4


def test_the_training_loader_decodes_on_the_device_only_when_asked(imagenette_root) -> None:
    from canon.engine import distributed as dist
    from canon.engine import setup

    ctx = dist.DistributedContext(rank=0, local_rank=0, world_size=1, device=CPU)
    train_set = _recipe_train("resnet18-imagenette5", imagenette_root)
    val_set = build_datasets(DataConfig()).val
    config = load_recipe("resnet18-imagenette5").train
    asked = dataclasses.replace(config, decode_on_device=True, workers=0)
    loader = setup._loaders(train_set, val_set, asked, ctx)[1]
    assert isinstance(loader, DeviceDecodedBatches)
    assert not isinstance(setup._loaders(train_set, val_set, config, ctx)[1],
                          DeviceDecodedBatches)
