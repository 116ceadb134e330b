"""DataConfig validation, build_datasets on the bundled sample, statistics cache, and loaders."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from canon.cli import main
from canon.data import BadImageWarning, DataConfig, ShuffleSampler, build_datasets, build_loader
from canon.data.datasets import load_sample
from canon.data.sampling import SeededSamples
from canon.data.stats import load_or_compute_stats, stats_cache_path
from canon.errors import ConfigError
from canon.recipes import load_recipe


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"augmentation": "alexnet2012"}, "data.augmentation"),
        ({"mean": "median"}, "data.mean"),
        ({"crop_size": 0}, "data.crop_size"),
        ({"crop_size": 64, "resize_size": 32}, "data.resize_size"),
        ({"scale_range": (512, 256)}, "data.scale_range"),
        ({"scale_range": (16, 64)}, "data.scale_range"),
        ({"pca_std": -0.1}, "data.pca_std"),
        ({"area_range": (0.0, 1.0)}, "data.area_range"),
        ({"flip": "yes"}, "data.flip"),
    ],
)
def test_bad_values_name_their_field(values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        DataConfig(**values)


def test_from_dict_lists_valid_keys():
    config = DataConfig.from_dict({"augmentation": "vgg", "crop_size": 224, "resize_size": 256,
                                   "scale_range": [256, 512]})
    assert config.scale_range == (256, 512)
    assert config.multi_scale_test_sizes() == (256, 384, 512)  # VGG s3.2, jittered S
    with pytest.raises(ConfigError, match=r"unknown data key\(s\) \['crop'\].*crop_size"):
        DataConfig.from_dict({"crop": 224})


def test_default_config_builds_the_sample(tmp_path):
    sets = build_datasets(DataConfig(), root_cache=tmp_path)
    train, val = sets.train, sets.val
    assert (len(train), len(val)) == (5000, 1000)
    assert train.classes[:3] == ["airplane", "automobile", "bird"]
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    # Validation is deterministic; its per-pixel mean is close to zero after subtraction.
    assert torch.equal(val[5][0], val[5][0])
    assert abs(torch.stack([val[i][0] for i in range(1000)]).mean()) < 0.05


def test_max_image_pixels_reaches_the_datasets(tmp_path):
    """A recipe's data.max_image_pixels is the limit build_datasets' images decode under."""
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            Image.new("RGB", (16, 12), "red").save(tmp_path / "data" / split / label / "small.png")
        Image.new("RGB", (64, 48), "red").save(tmp_path / "data" / split / "a" / "large.png")
    data = {"dataset": str(tmp_path / "data"), "augmentation": "none", "crop_size": 8,
            "resize_size": 8, "mean": "imagenet"}
    for limit, skipped in ((None, 0), (1000, 1)):  # large.png: 64 x 48 = 3,072 pixels
        config = DataConfig.from_dict(data | ({"max_image_pixels": limit} if limit else {}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sets = build_datasets(config, root_cache=tmp_path / "cache")
            items = [dataset[i] for dataset in (sets.train, sets.val) for i in range(len(dataset))]
        assert len(items) == 6 and items.count(None) == 2 * skipped
        messages = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
        assert len(messages) == 2 * skipped
        assert all("large.png: 64 x 48 = 3,072 pixels, over the limit of 1,000" in message
                   for message in messages)


def test_statistics_are_cached(tmp_path, monkeypatch):
    sample = load_sample("train")
    first, path = load_or_compute_stats(sample, 32, cache=tmp_path, progress=False)
    assert path == stats_cache_path(sample, 32, tmp_path) and path.is_file()

    def must_not_run(*args, **kwargs):
        raise AssertionError("statistics were recomputed despite the cache")

    monkeypatch.setattr("canon.data.stats.compute_stats", must_not_run)
    second, _ = load_or_compute_stats(sample, 32, cache=tmp_path, progress=False)
    assert torch.equal(first.mean_image, second.mean_image)
    assert torch.equal(first.pca_eigvec, second.pca_eigvec) and second.images == 5000

    # a cache file cut short (a full disk, a killed copy) is computed again, not a crash
    path = stats_cache_path(sample, 32, tmp_path)
    path.write_bytes(path.read_bytes()[:5])
    monkeypatch.undo()
    third, _ = load_or_compute_stats(sample, 32, cache=tmp_path, progress=False)
    assert torch.equal(first.pca_eigvec, third.pca_eigvec)


def test_stats_for_a_recipe_are_the_ones_its_runs_read(tmp_path, capsys, monkeypatch):
    """AlexNet's runs read the statistics of central squares at 256: canon stats --recipe
    caches those, so that training finds them."""
    for label in ("apple", "pear"):
        for split, count in (("train", 3), ("val", 1)):
            (tmp_path / "fruit" / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12, 9), (i * 60, 90, 0)).save(
                    tmp_path / "fruit" / split / label / f"{i}.png")
    cache = tmp_path / "cache"
    main(["stats", str(tmp_path / "fruit"), "--recipe", "alexnet", "--cache", str(cache)])
    assert "-256-center-square.safetensors" in capsys.readouterr().out

    def must_not_run(*args, **kwargs):
        raise AssertionError("training computed statistics canon stats had cached")

    monkeypatch.setattr("canon.data.stats.compute_stats", must_not_run)
    config = load_recipe("alexnet", [("data.dataset", str(tmp_path / "fruit"))]).data
    build_datasets(config, root_cache=cache)
    for refused, said in ((["--recipe", "resnet50-goyal"], "read no statistics"),
                          (["--recipe", "alexnet", "--size", "32"], "not allowed with")):
        with pytest.raises(SystemExit):
            main(["stats", str(tmp_path / "fruit"), "--cache", str(cache), *refused])
        assert said in capsys.readouterr().err


def test_stats_verb(tmp_path, capsys):
    main(["stats", "sample", "--cache", str(tmp_path)])
    out = capsys.readouterr().out
    assert "images: 5000 (skipped 0)" in out and "channel mean (RGB, 0-1): (0.49" in out
    stats, _ = load_or_compute_stats(load_sample("train"), 32, cache=tmp_path, progress=False)
    first_eigenvector = ", ".join(f"{v:.4f}" for v in stats.pca_eigvec[:, 0].tolist())
    assert f"PCA eigenvectors: ({first_eigenvector}), (" in out
    assert f"cached at {tmp_path}" in out
    with pytest.raises(SystemExit):
        main(["stats", "/no/such/folder", "--cache", str(tmp_path)])
    assert "neither sample, cifar10, cifar100" in capsys.readouterr().err


def _order(loader) -> list[int]:
    return [label for _, labels in loader for label in labels.tolist()]


def test_shuffling_depends_only_on_seed_and_epoch():
    indexed = load_sample("test")  # raw uint8 images; labels identify the order well enough
    first = _order(build_loader(indexed, 100, train=True, seed=3))
    assert first == _order(build_loader(indexed, 100, train=True, seed=3))
    assert first != _order(build_loader(indexed, 100, train=True, seed=4))
    loader = build_loader(indexed, 100, train=True, seed=3)
    loader.sampler.set_epoch(1)
    assert _order(loader) != first
    sampler = ShuffleSampler(indexed, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) == list(loader.sampler)
    assert _order(build_loader(indexed, 100, train=False)) == indexed.labels
    # consecutive seeds (ensemble members) are not each other's orders an epoch apart
    next_seed = ShuffleSampler(indexed, seed=4)
    assert list(next_seed) != list(sampler)


class _Draws(torch.utils.data.Dataset):
    """Each sample is a draw from torch's global generator, as a transform's would be."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.randint(2**62, (2,))


def test_every_sample_and_epoch_draws_its_own_augmentation():
    """torch's CPU generator reads a seed's low 32 bits alone; every (epoch, index) must still
    differ there, or later epochs replay earlier ones' crops on neighbouring images."""
    draws = SeededSamples(_Draws(), seed=0)
    keys = range(8 * len(draws))  # epochs 0-7
    seen = {tuple(draws[key].tolist()) for key in keys}
    assert len(seen) == len(keys)
    assert torch.equal(draws[70], draws[70])  # and each is fixed by its key


def test_drop_last_and_worker_augmentation_are_seeded(tmp_path):
    train = build_datasets(DataConfig(), root_cache=tmp_path).train
    loader = build_loader(train, 128, train=True, workers=2, seed=7)
    assert len(loader) == 5000 // 128
    first = next(iter(loader))[0]
    again = next(iter(build_loader(train, 128, train=True, workers=2, seed=7)))[0]
    assert torch.equal(first, again)  # same crops and flips from the same seed
    # The same images in the same order: another seed, other crops and flips.
    in_order = [next(iter(build_loader(train, 128, train=True, workers=2, seed=seed,
                                       sampler=range(len(train)))))[0] for seed in (7, 7, 8)]
    assert torch.equal(in_order[0], in_order[1]) and not torch.equal(in_order[0], in_order[2])
    assert len(build_loader(train, 128, train=False)) == -(-5000 // 128)
