"""canon.data.batched (issue 14): the batched on-device augmentation of in-memory sets gives
exactly the per-image pipeline's crops for the same draws and the same output statistics over
the bundled sample; a sample's draws are a function of (seed, key) alone, whatever batch it is
in; and it is what training uses for CIFAR unless train.data_on_device is off."""

from __future__ import annotations

import dataclasses

import torch

from canon.data import batched
from canon.data.batched import BatchedCrop, DeviceBatches, held_images
from canon.data.config import DataConfig
from canon.data.labeled import ImageSubset
from canon.data.loaders import build_datasets
from canon.data.sampling import EpochKeys
from canon.engine import distributed as dist
from canon.engine import setup
from canon.recipes import load_recipe


def _sample_train(**changes):
    config = dataclasses.replace(DataConfig(dataset="sample", mean="pixel", divide_std=True),
                                 **changes)
    return build_datasets(config).train


def test_batched_crops_equal_the_per_image_pipeline_for_the_same_draws() -> None:
    for pca_std in (0.0, 0.1):
        train = _sample_train(pca_std=pca_std)
        images = held_images(train)[:16]
        crop = BatchedCrop.of(train.transform, 32, 32)
        assert crop is not None and crop.padding == 4
        keys = torch.arange(5000, 5016)
        batched = crop(images, keys, seed=3)
        assert batched.shape == (16, 3, 32, 32)
        assert batched.is_contiguous(memory_format=torch.channels_last)
        tops, lefts, flips, alphas = crop.draws(keys, 3, 32, 32)
        assert len(set(tops.tolist())) > 3 and 0 < int(flips.sum()) < 16
        per_image = train.transform
        for i in range(16):
            box = (int(tops[i]) - 4, int(lefts[i]) - 4)
            per_image.crop.box = lambda h, w, box=box: box
            per_image.flip = (lambda x: x.flip(-1)) if flips[i] else None
            if per_image.fancy_pca is not None:
                noise = per_image.fancy_pca.shift(alphas[i])
                per_image.fancy_pca.noise = lambda noise=noise: noise
            torch.testing.assert_close(batched[i], per_image(images[i]), atol=1e-5, rtol=0)


def test_the_normalisation_constants_go_to_the_device_once(monkeypatch) -> None:
    """A copy from host memory every batch makes the host wait for the GPU's queue (the
    CUDA-graph CIFAR loop's overlap); on the CPU the same cache shows as one mean_at call."""
    train = _sample_train(pca_std=0.1)
    crop = BatchedCrop.of(train.transform, 32, 32)
    calls = []
    mean_at = crop.normalize.mean_at
    monkeypatch.setattr(crop.normalize, "mean_at", lambda *size: calls.append(size) or
                        mean_at(*size))
    images = held_images(train)[:8]
    first = crop(images, torch.arange(8), seed=1)
    assert torch.equal(crop(images, torch.arange(8), seed=1), first) and calls == [(32, 32)]


def test_batched_output_statistics_equal_the_per_image_pipelines() -> None:
    train = _sample_train()
    images = held_images(train)
    crop = BatchedCrop.of(train.transform, 32, 32)
    batched = crop(images, torch.arange(len(images)), seed=0)
    torch.manual_seed(0)
    per_image = torch.stack([train[i][0] for i in range(len(train))])
    # Per channel, and per channel and row or column (where the zero padding shows).
    for dims in ((0, 2, 3), (0, 3), (0, 2)):
        torch.testing.assert_close(batched.mean(dims), per_image.mean(dims), atol=0.03, rtol=0)
        torch.testing.assert_close(batched.std(dims), per_image.std(dims), atol=0, rtol=0.03)
    # What those statistics cannot see: reflections, half of the images (as RandomFlip's
    # p=0.5), and crop offsets spread over all 9 x 9 places of the padded image.
    tops, lefts, flips, _ = crop.draws(torch.arange(20000), 0, 32, 32)
    assert abs(flips.double().mean().item() - 0.5) < 0.015
    assert set(tops.tolist()) == set(lefts.tolist()) == set(range(9))


def test_a_samples_draws_depend_on_seed_and_key_only() -> None:
    train = _sample_train(pca_std=0.1)
    images, labels = held_images(train), train.labels
    crop = BatchedCrop.of(train.transform, 32, 32)
    keys = torch.arange(5000, 5000 + 96)  # epoch 1's first 96 samples
    whole = crop(images[:96], keys, seed=7)
    halves = torch.cat([crop(images[:40], keys[:40], 7), crop(images[40:96], keys[40:], 7)])
    assert torch.equal(whole, halves)  # another batch size or accumulation: the same crops
    assert not torch.equal(crop(images[:96], keys, seed=8), whole)
    alphas = crop.draws(torch.arange(20_000), 7, 32, 32)[3]
    torch.testing.assert_close(alphas.std(0), torch.full((3,), 0.1), atol=0.004, rtol=0)
    torch.testing.assert_close(alphas.mean(0), torch.zeros(3), atol=0.004, rtol=0)

    order = EpochKeys()
    order.keys = keys.tolist()
    loader = DeviceBatches(images, labels, order, crop, 32, seed=7, device="cpu")
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    assert torch.equal(torch.cat([images for images, _ in batches]), whole)
    assert torch.equal(batches[0][1], torch.tensor(labels[:32]))


def test_training_holds_cifar_on_the_device_unless_told_not_to() -> None:
    ctx = dist.DistributedContext(rank=0, local_rank=0, world_size=1,
                                  device=torch.device("cpu"))
    train, val = _sample_train(), build_datasets(DataConfig()).val
    on = load_recipe("quickstart").train
    loader = setup._loaders(train, val, on, ctx)[1]
    assert isinstance(loader, DeviceBatches) and loader.images.data_ptr() == \
        held_images(train).data_ptr()  # on the CPU the images are not copied
    off = dataclasses.replace(on, data_on_device=False)
    assert not isinstance(setup._loaders(train, val, off, ctx)[1], DeviceBatches)
    subset = ImageSubset(train, [3, 1], transform=train.transform)
    assert torch.equal(held_images(subset), held_images(train)[[3, 1]])
    # Rescaled crops (the ImageNet pipelines) stay per image: no batched form.
    scaled = _sample_train(augmentation="resnet", scale_range=(32, 40), padding=0)
    assert BatchedCrop.of(scaled.transform, 32, 32) is None


def test_the_extreme_draws_give_a_finite_colour_shift(monkeypatch) -> None:
    crop = BatchedCrop.of(_sample_train(pca_std=0.1).transform, 32, 32)
    for extreme in (0, 2**32 - 1):  # the smallest and the largest 32-bit draws
        monkeypatch.setattr(batched, "sample_bits",
                            lambda keys, seed, count, e=extreme: torch.full((len(keys), count), e))
        assert torch.isfinite(crop.draws(torch.arange(2), 0, 32, 32)[3]).all()
