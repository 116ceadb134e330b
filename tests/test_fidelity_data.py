"""The papers' data pipelines where canon once departed from them: AlexNet's central 256 square
(Krizhevsky et al. s2), GoogLeNet's random interpolation (Szegedy et al. s6), mean subtraction
without division by a standard deviation (all five papers), and a validation set held out of
the training split (He et al. s4.2)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

import canon.data.datasets
from canon.data import ArrayImages, DataConfig, build_datasets
from canon.data.datasets import load_sample
from canon.data.folders import FolderImages
from canon.data.geometry import fit_image, resize_image
from canon.data.holdout import hold_out
from canon.data.loaders import dataset_stats
from canon.data.normalize import ToFloat, make_normalize
from canon.data.preprocess import center_transform, eval_preprocess
from canon.data.stats import _load, stats_cache_path
from canon.data.transforms import INTERPOLATION_JITTER, RandomAreaCrop, training_transform
from canon.data.views import ProtocolViews, parse_protocol, ten_crop
from canon.errors import ConfigError
from canon.recipes import RECIPE_DIR, list_recipes, load_recipe


@pytest.fixture(scope="module")
def landscape(imagenette_root):
    """A real ImageNet photo at 300 x 500 (H x W)."""
    photo = FolderImages(imagenette_root / "train").load_image(0)
    return resize_image(photo, 300, 500, "bilinear")


def _alexnet(**values) -> DataConfig:
    return DataConfig(augmentation="alexnet", crop_size=224, resize_size=256, mean="imagenet",
                      **values)


def _central_square(image: torch.Tensor) -> torch.Tensor:
    """By hand: shorter side 300 -> 256 makes 500 -> 426 (426.67, truncated as torchvision
    does); the central 256 columns."""
    rescaled = resize_image(image, 256, 426, "bilinear")
    return rescaled[:, :, 85 : 85 + 256]


def test_alexnet_trains_on_the_central_square_of_the_shorter_side_rescale(landscape):
    """Krizhevsky et al. s2: shorter side to 256, then "the central 256x256 patch"; the random
    crops come from it (a 256 crop: the patch itself; a 224 crop: a window of it)."""
    config = _alexnet(flip=False)
    normalize = make_normalize(config, None)
    square = normalize(ToFloat()(_central_square(landscape)))
    whole = training_transform(replace(config, crop_size=256), None)
    assert torch.allclose(whole(landscape), square, atol=1e-6)
    squashed = normalize(ToFloat()(resize_image(landscape, 256, 256, "bilinear")))
    assert not torch.allclose(whole(landscape), squashed, atol=1e-2)
    torch.manual_seed(0)
    crop = training_transform(config, None)(landscape)
    assert any(torch.allclose(crop, square[:, top : top + 224, left : left + 224], atol=1e-6)
               for top in range(33) for left in range(33))


def test_alexnet_ten_crops_come_from_the_central_square(landscape):
    """s4.1's five patches and their reflections, of s2's central 256 x 256 patch."""
    config = _alexnet()
    normalize = make_normalize(config, None)
    expected = normalize(ten_crop(ToFloat()(_central_square(landscape)), 224))
    (views,) = ProtocolViews(parse_protocol("ten-crop"), eval_preprocess(config))(landscape)
    assert views.shape == (10, 3, 224, 224)
    assert torch.allclose(views, expected, atol=1e-6)
    squash = eval_preprocess(_alexnet(alexnet_resize="squash"))
    (squashed,) = ProtocolViews(parse_protocol("ten-crop"), squash)(landscape)
    whole = ToFloat()(resize_image(landscape, 256, 256, "bilinear"))
    assert torch.allclose(squashed, normalize(ten_crop(whole, 224)), atol=1e-6)


def test_alexnet_resize_is_validated_and_on_the_recipe():
    assert DataConfig().alexnet_resize == "center-square"
    with pytest.raises(ConfigError, match=r"data\.alexnet_resize must be one of center-square"):
        DataConfig(alexnet_resize="crop")
    assert load_recipe("alexnet").data.alexnet_resize == "center-square"


def test_alexnet_and_zfnet_mean_image_is_of_the_central_squares(tmp_path):
    """Their training set is the central squares, so their mean image is of those (under a
    cache key of its own); whole-image pipelines keep the squashed images' mean."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 24, 40), dtype=torch.uint8, generator=generator)
    array = ArrayImages(images, [i % 2 for i in range(12)], ["a", "b"], name="wide")
    central = fit_image(images, 16, "center-square", "bilinear").double().mean(0) / 255
    squashed = fit_image(images, 16, "squash", "bilinear").double().mean(0) / 255
    for name, expected in (("alexnet", central), ("zfnet", central), ("vgg", squashed)):
        config = DataConfig(augmentation=name, crop_size=16, resize_size=16)
        stats = dataset_stats(config, array, root_cache=tmp_path, progress=False)
        assert torch.allclose(stats.mean_image.double(), expected, atol=1e-6)
    squash = DataConfig(augmentation="alexnet", crop_size=16, resize_size=16,
                        alexnet_resize="squash")
    stats = dataset_stats(squash, array, root_cache=tmp_path, progress=False)
    assert torch.allclose(stats.mean_image.double(), squashed, atol=1e-6)
    keys = {stats_cache_path(array, 16, tmp_path), stats_cache_path(array, 16, tmp_path,
                                                                    "center-square")}
    assert len(keys) == 2 and all(path.is_file() for path in keys)


def test_googlenet_draws_one_of_four_interpolations_per_image():
    """Szegedy et al. s6: "bilinear, area, nearest neighbor and cubic, with equal
    probability"; drawn from torch's generator, so a seed fixes them."""
    config = DataConfig(augmentation="googlenet", crop_size=32, resize_size=40, mean="imagenet")
    crop = training_transform(config, None).crop
    assert isinstance(crop, RandomAreaCrop) and crop.interpolations == INTERPOLATION_JITTER
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        draws.append([crop.interpolation() for _ in range(400)])
    assert draws[0] == draws[1]
    counts = Counter(draws[0])
    assert set(counts) == {"bilinear", "area", "nearest", "bicubic"}
    assert all(70 <= count <= 130 for count in counts.values())  # 100 +- 3.5 sigma
    fixed = training_transform(replace(config, interpolation_jitter=False), None).crop
    assert fixed.interpolations == ("bilinear",)


@pytest.fixture(scope="module")
def sample_image():
    return load_sample("train").load_image(3)


def test_googlenet_crop_is_resized_with_the_drawn_interpolation(sample_image):
    crop = RandomAreaCrop(24, interpolations=INTERPOLATION_JITTER)
    used = set()
    for seed in range(16):
        torch.manual_seed(seed)
        top, left, height, width = crop.box(*sample_image.shape[-2:])
        name = crop.interpolation()
        torch.manual_seed(seed)
        patch = sample_image[:, top : top + height, left : left + width]
        assert torch.equal(crop(sample_image), resize_image(patch, 24, 24, name))
        used.add(name)
    assert used == set(INTERPOLATION_JITTER)
    outputs = [resize_image(sample_image, 20, 20, name) for name in INTERPOLATION_JITTER]
    assert all(not torch.equal(a, b) for i, a in enumerate(outputs) for b in outputs[:i])


def test_googlenet_crops_subtract_the_mean_image_under_them():
    """An image equal to the mean image (GoogLeNet's recipe subtracts the pixel mean) comes out
    near zero from any random-area crop, with each of the four filters: the mean's window
    under the crop is subtracted, not the whole mean image squeezed into the crop."""
    ramp = torch.linspace(0, 1, 32)
    mean = torch.stack([ramp.view(1, 32).expand(32, 32), ramp.view(32, 1).expand(32, 32),
                        ramp.flip(0).view(1, 32).expand(32, 32)])
    config = DataConfig(augmentation="googlenet", crop_size=24, resize_size=32, mean="pixel",
                        photometric=0.0)
    stats = SimpleNamespace(mean_image=mean, channel_std=torch.ones(3))
    transform = training_transform(config, stats)
    image = (resize_image(mean, 60, 90, "bilinear") * 255).round().to(torch.uint8)
    torch.manual_seed(0)
    for _ in range(40):
        assert transform(image).abs().max() < 0.03
    whole = make_normalize(config, stats)  # the mean squeezed into the crop, as it was
    assert (ToFloat()(resize_image(image[:, :20, :20], 24, 24, "bilinear")) - whole.mean_at(24, 24)
            ).abs().max() > 0.3


def test_area_interpolation_averages_boxes():
    image = torch.arange(16, dtype=torch.uint8).view(1, 4, 4).expand(3, 4, 4)
    shrunk = resize_image(image, 2, 2, "area")
    assert shrunk.dtype == torch.uint8
    assert shrunk[0].tolist() == [[2, 4], [10, 12]]  # means 2.5, 4.5, 10.5, 12.5, rounded even


@pytest.mark.parametrize("shape", [(3, 37, 50), (2, 3, 90, 41)])
@pytest.mark.parametrize("size", [(64, 71), (20, 13), (37, 120)])
def test_area_interpolation_is_adaptive_average_pooling(shape, size):
    """canon's separable box passes equal F.interpolate's "area", enlarging and shrinking;
    on uint8 pixels exactly, rounding of halves included."""
    image = torch.rand(shape, generator=torch.Generator().manual_seed(sum(size)))
    for pixels in (image, (image * 255).to(torch.uint8)):
        batch = pixels.float() if pixels.dim() == 4 else pixels.float().unsqueeze(0)
        expected = F.interpolate(batch, size=size, mode="area").view(*shape[:-2], *size)
        if pixels.dtype == torch.uint8:
            assert torch.equal(resize_image(pixels, *size, "area"),
                               expected.round().to(torch.uint8))
        else:
            assert torch.allclose(resize_image(pixels, *size, "area"), expected, atol=1e-6)


def test_mean_subtraction_alone_is_the_default():
    """The five papers subtract a mean and do not divide by a standard deviation."""
    assert DataConfig().divide_std is False
    assert make_normalize(DataConfig(mean="imagenet"), None).std is None


def test_the_papers_0_to_255_pixels_where_their_constants_assume_them():
    """AlexNet's LRN constants and unit biases, ZFNet's RMS radius and the N(0, 0.01) weights
    of AlexNet, ZFNet and VGG are for mean-subtracted 0-255 values: those recipes scale to
    them, on every normalising path (a std of 1/255); the ResNets keep [0, 1]."""
    for name in ("alexnet", "zfnet", "vgg16", "googlenet"):
        assert load_recipe(name).data.pixel_scale == 255, name
    assert load_recipe("resnet50").data.pixel_scale == 1
    image, mean = torch.rand(3, 4, 4), torch.rand(3)
    normalize = make_normalize(DataConfig(mean="imagenet", pixel_scale=255), None)
    normalize.mean = mean.view(3, 1, 1)
    torch.testing.assert_close(normalize(image), 255 * (image - mean.view(3, 1, 1)))
    with pytest.raises(ConfigError, match=r"pixel_scale 255 .* divide_std would scale back"):
        DataConfig(pixel_scale=255, divide_std=True)
    with pytest.raises(ConfigError, match=r"data\.pixel_scale must be 1 or 255, got 100"):
        DataConfig(pixel_scale=100)


def _data_sections(path: Path) -> list[dict]:
    """The `data:` mappings of a recipe file and of its `base:` chain."""
    sections = []
    while True:
        values = yaml.safe_load(path.read_text())
        sections.append(values.get("data") or {})
        if "base" not in values:
            return sections
        path = path.parent / f"{values['base']}.yaml"


FIVE_PAPERS = ("Krizhevsky et al. 2012", "Zeiler & Fergus 2013", "Simonyan & Zisserman 2014",
               "Szegedy et al. 2014", "He et al. 2015")


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_states_its_normalisation(name):
    """Every recipe says whether it divides by the std; the five papers' recipes do not
    (quickstart, canon's demonstration on the sample, does, and says why)."""
    sections = _data_sections(RECIPE_DIR / f"{name}.yaml")
    assert any("divide_std" in section for section in sections), f"{name}: divide_std unstated"
    recipe = load_recipe(name)
    if recipe.source.startswith(FIVE_PAPERS) and name != "quickstart":
        assert recipe.data.divide_std is False


def _record_splits(monkeypatch, name: str) -> list[str]:
    """Which splits canon.data.datasets' reader `name` is asked for."""
    original, read = getattr(canon.data.datasets, name), []

    def recording(*args):
        read.append(args[-1])
        return original(*args)

    monkeypatch.setattr(canon.data.datasets, name, recording)
    return read


def test_val_split_holds_out_training_images(tmp_path, monkeypatch):
    read = _record_splits(monkeypatch, "load_sample")
    sets = build_datasets(DataConfig(val_split=500), root_cache=tmp_path)
    assert read == ["train"]  # the test split is not read
    train, val = sets.train, sets.val
    assert (len(train), len(val)) == (4500, 500)
    assert not set(train.indices) & set(val.indices)
    assert sorted(train.indices + val.indices) == list(range(5000))
    assert Counter(val.labels) == dict.fromkeys(range(10), 50)  # stratified
    whole = load_sample("train")
    assert val.labels == [whole.labels[i] for i in val.indices]
    raw = whole.load_image(val.indices[7])
    assert torch.equal(val[7][0], center_transform(sets.preprocess)(raw))  # test transform
    stats = _load(stats_cache_path(train, 32, tmp_path))
    assert stats.images == 4500  # the statistics are of the training part alone
    again = build_datasets(DataConfig(val_split=500), root_cache=tmp_path).val
    assert again.indices == val.indices
    other = build_datasets(DataConfig(val_split=500, val_split_seed=1), root_cache=tmp_path).val
    assert other.indices != val.indices and len(other) == 500


def test_val_split_is_the_45k_5k_split_of_cifar10(cifar10_root, tmp_path, monkeypatch):
    """He et al. s4.2: "determined on a 45k/5k train/val split"."""
    read = _record_splits(monkeypatch, "read_cifar")
    config = DataConfig(dataset=str(cifar10_root), val_split=5000, mean="imagenet")
    sets = build_datasets(config, root_cache=tmp_path)
    assert read == ["train"]
    assert (len(sets.train), len(sets.val)) == (45000, 5000)
    assert Counter(sets.val.labels) == dict.fromkeys(range(10), 500)


def test_val_split_is_validated():
    with pytest.raises(ConfigError, match=r"data\.val_split"):
        DataConfig(val_split=-1)
    sample = load_sample("test")
    for count in (0, len(sample)):
        with pytest.raises(ConfigError, match=r"data\.val_split must hold out between 1 and"):
            hold_out(sample, count, 0)
    rest, held = hold_out(sample, 7, 3)  # 7 of 10 equal classes: the lowest seven give one
    assert sorted(held.labels) == list(range(7)) and len(rest) == len(sample) - 7


@pytest.mark.parametrize(("name", "scales"), [
    ("vgg11", (224, 256, 288)), ("vgg16-s256", (224, 256, 288)),
    ("vgg16-s384", (352, 384, 416)), ("vgg16", (256, 384, 512)), ("vgg19", (256, 384, 512))])
def test_vgg_multi_scale_test_scales_follow_the_training_scale(name, scales):
    """Simonyan & Zisserman s4.2: Q = {S - 32, S, S + 32} for a fixed S, and
    {S_min, 0.5 (S_min + S_max), S_max} for a jittered one."""
    data = load_recipe(name).data
    assert data.multi_scale_test_sizes() == scales
