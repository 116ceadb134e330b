"""The papers' transforms, each checked for its defining property on real images."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from canon.data import DataConfig
from canon.data.datasets import load_sample
from canon.data.folders import FolderImages
from canon.data.geometry import (
    center_box,
    crop_box,
    cut,
    overlap,
    resize_image,
    shorter_side_size,
)
from canon.data.normalize import Normalize, ToFloat, make_normalize
from canon.data.preprocess import EvalPreprocess, center_transform, eval_preprocess
from canon.data.stats import compute_stats, imagenet_pca
from canon.data.transforms import (
    Compose,
    FancyPCA,
    Photometric,
    RandomAreaCrop,
    RandomCrop,
    RandomFlip,
    RescaleShorter,
    RescaleSquare,
    make_fancy_pca,
    training_transform,
)
from canon.data.views import ProtocolViews, parse_protocol, ten_crop
from canon.errors import ConfigError


@pytest.fixture(scope="module")
def sample():
    return load_sample("train")


@pytest.fixture(scope="module")
def sample_stats(sample):
    return compute_stats(sample, 32, progress=False)


@pytest.fixture(scope="module")
def photos(imagenette_root):
    """Twelve real ImageNet JPEGs of assorted sizes, decoded (uint8 3 x H x W)."""
    folder = FolderImages(imagenette_root / "train")
    return [folder.load_image(i) for i in range(0, len(folder), len(folder) // 12)][:12]


def _find_window(source: torch.Tensor, crop: torch.Tensor) -> list[tuple[int, int]]:
    size = crop.shape[-1]
    height, width = source.shape[-2:]
    return [
        (top, left)
        for top in range(height - size + 1)
        for left in range(width - size + 1)
        if torch.equal(source[:, top : top + size, left : left + size], crop)
    ]


def test_random_crop_is_a_window_and_reaches_every_offset(sample):
    torch.manual_seed(0)
    image = sample.load_image(7)
    crop = RandomCrop(28)
    offsets = set()
    for _ in range(400):
        out = crop(image)
        assert out.shape == (3, 28, 28)
        found = _find_window(image, out)
        assert found, "a crop must be a window of the source"
        offsets.update(found)
    assert offsets == {(t, left) for t in range(5) for left in range(5)}


def test_cifar_crop_pads_four_zero_pixels(sample):
    """He et al. s4.2: pad 4 on each side (zeros = the mean after subtraction), crop 32."""
    torch.manual_seed(1)
    image = ToFloat()(sample.load_image(3)) + 1  # no zero pixels of its own
    padded = torch.nn.functional.pad(image, [4] * 4)
    crop = RandomCrop(32, padding=4)
    shifts = set()
    for _ in range(300):
        out = crop(image)
        (top, left), = _find_window(padded, out)
        shifts.add((top, left))
        zeros = (out == 0).all(0)
        assert zeros.sum() == 32 * 32 - (32 - abs(top - 4)) * (32 - abs(left - 4))
    assert {top for top, _ in shifts} == {left for _, left in shifts} == set(range(9))


def test_padding_wider_than_the_crop_still_gives_crops_of_the_padded_image():
    """Windows partly or wholly in the padding: every one equals the same window of the
    zero-padded image, as the batched path cuts it."""
    image = torch.arange(1, 1 + 3 * 6 * 5, dtype=torch.float32).view(3, 6, 5)
    padded = torch.nn.functional.pad(image, [10] * 4)
    for top in range(-10, 6 + 10 - 4 + 1):
        for left in range(-10, 5 + 10 - 4 + 1):
            inside, pads = overlap(top, left, 4, 6, 5)
            window = torch.nn.functional.pad(cut(image, inside), pads)
            assert torch.equal(window, crop_box(padded, top + 10, left + 10, 4)), (top, left)
    config = DataConfig(augmentation="cifar", crop_size=8, resize_size=8, padding=10,
                        mean="imagenet")
    transform = training_transform(config, None)
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    assert {tuple(transform(pixels).shape) for _ in range(200)} == {(3, 8, 8)}


def test_center_crop_position(photos):
    """The test-time centre crop, cut before the float work, equals cropping the whole
    normalised image at the centre; the views' centre protocol is the same crop."""
    preprocess = EvalPreprocess(128, 150, Normalize(torch.rand(3, 40, 40)))
    for image in photos[:3]:
        whole = preprocess(image)
        expected = TF.center_crop(whole, [128, 128])
        assert torch.allclose(center_transform(preprocess)(image), expected, atol=1e-6)
        (view,) = ProtocolViews(parse_protocol("center"), preprocess)(image)
        assert torch.allclose(view[0], expected, atol=1e-6)
    with pytest.raises(ConfigError, match="cannot take 160x160 crops of a 150x"):
        EvalPreprocess(160, 150, Normalize(torch.zeros(3))).center(photos[0])


def test_test_time_geometry_is_torchvision_s():
    """Resize(256) and CenterCrop(224) as torchvision computes them, whose weights' published
    accuracy was measured so: the longer side truncated, an odd margin split half to even."""
    for height in range(224, 420, 7):
        for width in range(224, 420, 13):
            shape = TF.resize(torch.zeros(1, height, width), 256, antialias=True).shape[-2:]
            assert shorter_side_size(height, width, 256) == tuple(shape), (height, width)
            pixels = torch.arange(height * width).view(1, height, width)
            top, left = center_box(height, width, 224)
            assert torch.equal(TF.center_crop(pixels, [224, 224]),
                               pixels[:, top : top + 224, left : left + 224]), (height, width)


def test_flip_is_identity_or_mirror_and_both_happen(sample):
    torch.manual_seed(2)
    image = sample.load_image(11)
    outcomes = []
    for _ in range(200):
        out = RandomFlip()(image)
        assert torch.equal(out, image) or torch.equal(out, image.flip(-1))
        outcomes.append(torch.equal(out, image))
    assert 60 < sum(outcomes) < 140


def test_scale_jitter_range_and_aspect(photos):
    """VGG s3.1 / ResNet s3.4: shorter side uniform in [low, high], aspect ratio kept."""
    torch.manual_seed(3)
    rescale = RescaleShorter(144, 200)
    sides = []
    for image in photos:
        height, width = image.shape[-2:]
        for _ in range(20):
            out = rescale(image)
            short, long = sorted(out.shape[-2:])
            assert 144 <= short <= 200
            assert long == pytest.approx(short * max(height, width) / min(height, width), abs=1)
            sides.append(short)
    assert min(sides) < 150 and max(sides) > 195


def test_rescale_square_keeps_the_central_square_or_squashes(photos):
    """AlexNet s2: shorter side to 256, then the central 256x256 patch (torchvision's Resize and
    CenterCrop give it); or the whole image squashed."""
    for image in photos[:3]:  # landscape and portrait
        expected = TF.center_crop(TF.resize(image, 256, antialias=True), 256)
        assert torch.equal(RescaleSquare(256)(image), expected)
    image = photos[1]
    squashed = RescaleSquare(256, "squash")(image)
    assert torch.equal(squashed, resize_image(image, 256, 256, "bilinear"))


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "area"])
@pytest.mark.parametrize(("size", "new_size"), [(150, 224), (224, 100), (500, 224)])
def test_every_resize_keeps_the_picture_centred(interpolation, size, new_size):
    """Each output pixel samples around its centre's place in the input: a ramp of input
    column numbers comes out as the output pixels' centres mapped back (nearest: to the
    input pixel nearest each, as PIL's; torchvision's legacy NEAREST took the one left of it,
    moving the picture by half an output pixel)."""
    ramp = torch.arange(size, dtype=torch.float64).expand(1, 4, size)
    resized = resize_image(ramp, 4, new_size, interpolation)[0, 0]
    centres = (torch.arange(new_size, dtype=torch.float64) + 0.5) * size / new_size - 0.5
    inside = slice(new_size // 8, new_size - new_size // 8)  # clear of the edges' clamping
    assert abs(float((resized - centres)[inside].mean())) < 0.05
    assert float((resized - centres)[inside].abs().max()) <= 0.5 * max(1, size / new_size) + 1e-6


def test_area_crop_boxes_respect_area_and_aspect(photos):
    """GoogLeNet s6: 8%-100% of the area, aspect ratio in [3/4, 4/3], drawn across both ranges
    and placed anywhere (a fixed box would keep within the bounds too)."""
    torch.manual_seed(4)
    crop = RandomAreaCrop(96)
    areas, aspects, boxes = [], [], set()
    for image in photos:
        height, width = image.shape[-2:]
        for _ in range(30):
            top, left, crop_h, crop_w = crop.box(height, width)
            assert top >= 0 and top + crop_h <= height and left >= 0 and left + crop_w <= width
            areas.append(crop_h * crop_w / (height * width))
            aspects.append(crop_w / crop_h)
            boxes.add((height, width, top, left, crop_h, crop_w))
        assert crop(image).shape == (3, 96, 96)
    assert 0.08 - 0.01 <= min(areas) < 0.15 and 0.85 < max(areas) <= 1
    assert 3 / 4 - 0.02 <= min(aspects) < 0.8 and 1.25 < max(aspects) <= 4 / 3 + 0.02
    assert len(boxes) > 0.9 * len(areas)


def test_pixel_mean_subtraction_gives_zero_mean_training_set(sample, sample_stats):
    normalize = Normalize(sample_stats.mean_image)
    images = torch.stack([normalize(ToFloat()(img)) for img in sample.images])
    assert images.mean(0).abs().max() < 1e-5
    channel = Normalize(sample_stats.channel_mean, sample_stats.channel_std)
    scaled = torch.stack([channel(ToFloat()(img)) for img in sample.images])
    assert scaled.mean((0, 2, 3)).abs().max() < 1e-4
    assert scaled.std((0, 2, 3)) == pytest.approx(torch.ones(3), abs=1e-3)


def test_mean_image_is_resized_to_the_input(sample_stats):
    normalize = Normalize(sample_stats.mean_image)
    flat = torch.full((3, 64, 48), 0.5)
    out = normalize(flat)
    assert out.shape == (3, 64, 48)
    assert out.mean((1, 2)) == pytest.approx(0.5 - sample_stats.channel_mean, abs=2e-3)


def test_stats_match_a_direct_computation(sample, sample_stats):
    pixels = sample.images.double() / 255
    flat = pixels.permute(1, 0, 2, 3).reshape(3, -1)
    covariance = torch.cov(flat, correction=0)
    assert torch.allclose(sample_stats.mean_image.double(), pixels.mean(0), atol=1e-6)
    assert torch.allclose(sample_stats.rgb_covariance.double(), covariance, atol=1e-6)
    eigvec, eigval = sample_stats.pca_eigvec.double(), sample_stats.pca_eigval.double()
    assert torch.allclose(eigvec.T @ eigvec, torch.eye(3, dtype=torch.double), atol=1e-5)
    assert torch.allclose(covariance @ eigvec, eigvec * eigval, atol=1e-5)
    assert list(eigval) == sorted(eigval, reverse=True)


def test_fancy_pca_noise_lies_along_eigenvectors_with_paper_scale(sample_stats):
    """AlexNet s4.1: shift = sum_i alpha_i lambda_i p_i, alpha_i ~ N(0, 0.1^2)."""
    torch.manual_seed(5)
    pca = FancyPCA(sample_stats.pca_eigvec, sample_stats.pca_eigval, 0.1)
    noise = torch.stack([pca.noise() for _ in range(4000)])
    alphas = noise @ sample_stats.pca_eigvec / sample_stats.pca_eigval  # coefficients / lambda
    assert alphas.std(0) == pytest.approx(torch.full((3,), 0.1), rel=0.06)
    assert alphas.mean(0).abs().max() < 0.01
    correlation = torch.corrcoef(alphas.T) - torch.eye(3)
    assert correlation.abs().max() < 0.06
    image = torch.rand(3, 8, 8)
    shifted = pca(image) - image
    assert torch.allclose(shifted, shifted[:, :1, :1].expand_as(shifted))  # same for every pixel


def test_fancy_pca_scaled_by_the_eigenvalues_square_roots(sample_stats):
    """data.pca_scale=stdev: alpha_i times sqrt(lambda_i), Krizhevsky's cuda-convnet2 reading,
    along the same eigenvectors; recipes keep the paper's lambda_i unless they say so."""
    eigvec, eigval = torch.eye(3), torch.tensor([4.0, 1.0, 0.25])
    alpha = torch.ones(3)
    assert FancyPCA(eigvec, eigval, 0.1).shift(alpha).tolist() == [4.0, 1.0, 0.25]
    assert FancyPCA(eigvec, eigval, 0.1, "stdev").shift(alpha).tolist() == [2.0, 1.0, 0.5]
    config = DataConfig(pca_std=0.1, pca_scale="stdev")
    pca = make_fancy_pca(config, sample_stats)
    assert torch.allclose(pca.shift(alpha), sample_stats.pca_eigval.sqrt() @ pca.eigvec.T)
    assert make_fancy_pca(DataConfig(pca_std=0.1), sample_stats).scale == "eigenvalue"
    assert pca.to(torch.device("cpu")).scale == "stdev"  # as batched augmentation keeps it
    with pytest.raises(ConfigError, match=r"data\.pca_scale must be one of"):
        DataConfig(pca_scale="variance")
    with pytest.raises(ConfigError, match="scale must be one of eigenvalue, stdev, got 'eigen'"):
        FancyPCA(eigvec, eigval, 0.1, "eigen")


def test_photometric_factors_stop_at_zero():
    """Above strength 1 the factors' range [1 - s, 1 + s] reaches below 0, which blackens or
    inverts an image: they stop at 0, as ColorJitter's do."""
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 16).expand(3, 4, 16).clone()
    for _ in range(200):
        out = Photometric(1.5)(ramp)
        assert (out[..., 1:] >= out[..., :-1] - 1e-6).all()  # never inverted


@pytest.mark.parametrize(("field", "value", "message"), [
    ("photometric", float("nan"), r"data.photometric must be a finite number >= 0, got nan"),
    ("pca_std", float("inf"), r"data.pca_std must be a finite number >= 0, got inf"),
    ("aspect_range", (0.5, float("inf")), r"data.aspect_range must hold finite numbers"),
])
def test_data_settings_that_would_corrupt_images_are_refused(field, value, message):
    """A config built in Python is checked as a recipe's is: a NaN strength would turn the
    augmentation off without a word, an infinite one make NaN inputs."""
    with pytest.raises(ConfigError, match=message):
        DataConfig(**{field: value})


def test_imagenette_pca_agrees_with_imagenet_published(imagenette_root):
    """The real ImageNet JPEGs give nearly ImageNet's published eigen-decomposition."""
    stats = compute_stats(FolderImages(imagenette_root / "val"), 64, progress=False)
    eigval, eigvec = imagenet_pca()
    cosine = (stats.pca_eigvec[:, 0] @ eigvec[:, 0]).abs()
    assert cosine > 0.99
    assert stats.pca_eigval[0] == pytest.approx(eigval[0].item(), rel=0.25)


def test_photometric_stays_in_range(photos):
    torch.manual_seed(6)
    image = ToFloat()(photos[2])
    out = Photometric(0.4)(image)
    assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, image)
    assert torch.allclose(Photometric(0.0)(image), image, atol=1e-6)


@pytest.mark.parametrize("name", ["alexnet", "vgg", "resnet", "googlenet", "cifar", "none"])
def test_named_pipelines_produce_crops(name, photos, sample_stats):
    torch.manual_seed(7)
    config = DataConfig(
        augmentation=name, crop_size=32, resize_size=40, pca_std=0.1,
        scale_range=(36, 48) if name in ("vgg", "resnet") else None,
    )
    transform = training_transform(config, sample_stats)
    evaluation = eval_preprocess(config, sample_stats)
    for image in photos[:4]:
        out = transform(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        scaled = evaluation(image)
        expected = (40, 40) if name == "alexnet" else None
        if expected:
            assert tuple(scaled.shape[-2:]) == expected
        else:
            assert min(scaled.shape[-2:]) == 40


def test_imagenet_mean_needs_no_statistics(photos):
    config = DataConfig(augmentation="resnet", crop_size=64, resize_size=80, mean="imagenet",
                        pca_std=0.1, pca_source="imagenet")
    out = training_transform(config, None)(photos[0])
    assert out.shape == (3, 64, 64)
    assert math.isfinite(out.sum().item())


def test_mean_image_window_equals_resizing_then_cropping(sample_stats):
    """Normalize resamples the mean image only inside the crop, as TF.resize would whole."""
    normalize = Normalize(sample_stats.mean_image)  # 32 x 32
    for height, width, top, left, size in [(45, 70, 3, 30, 40), (20, 28, 2, 5, 16),
                                           (32, 32, 4, 1, 28), (33, 97, 0, 57, 33)]:
        whole = resize_image(sample_stats.mean_image, height, width, "bilinear")
        window = normalize.mean_at(height, width, (top, left, size, size))
        assert torch.allclose(window, crop_box(whole, top, left, size), atol=1e-6)


def _float_everything(config, stats):
    """The earlier order: all float work on the whole rescaled image, then crop and flip.
    AlexNet's square is rescaled in uint8, as CropFirst does; a shorter side in float, as
    CropFirst resamples its window."""
    if config.augmentation == "alexnet":
        rescale = [RescaleSquare(config.resize_size), ToFloat()]
    else:
        rescale = [ToFloat(), RescaleShorter(*(config.scale_range or (config.resize_size,) * 2))]
    padding = config.padding if config.augmentation == "cifar" else 0
    return Compose([*rescale, make_fancy_pca(config, stats),
                    make_normalize(config, stats), RandomCrop(config.crop_size, padding),
                    RandomFlip()])


@pytest.mark.parametrize("name", ["resnet", "alexnet", "vgg", "cifar"])
def test_crop_first_pipelines_equal_normalising_the_whole_image(name, photos, sample_stats):
    """Cutting the crop first changes no output: same draws, same pixels (up to float
    rounding where the image and the mean image are resampled to each jittered size)."""
    config = DataConfig(augmentation=name, crop_size=24, resize_size=32, pca_std=0.1,
                        scale_range=(32, 48) if name in ("vgg", "resnet") else None,
                        mean="channel" if name == "vgg" else "pixel")
    images = [image[:, :32, :40] for image in photos[:4]] if name == "cifar" else photos[:4]
    for seed, image in enumerate(images):
        outputs = []
        for pipeline in (_float_everything(config, sample_stats),
                         training_transform(config, sample_stats)):
            torch.manual_seed(seed)
            outputs.append(pipeline(image))
        assert torch.allclose(*outputs, atol=1e-5)
        assert name != "alexnet" or torch.equal(*outputs)  # no resampling of the mean at all


def test_zfnet_takes_one_of_the_ten_crops_of_the_centre_square(photos):
    """Zeiler & Fergus s3: shorter side to 256, the centre 256 x 256 region, one of its ten
    224 sub-crops (corners and centre, with or without reflection); here 64 -> 48."""
    torch.manual_seed(8)
    config = DataConfig(augmentation="zfnet", crop_size=48, resize_size=64, mean="imagenet",
                        divide_std=False)
    pipeline = training_transform(config, None)
    image = photos[5]
    square = RescaleShorter(64)(image)
    height, width = square.shape[-2:]
    assert height != width  # the centre square really is cut from a non-square image
    top, left = (height - 64) // 2, (width - 64) // 2
    square = ToFloat()(square[:, top : top + 64, left : left + 64])
    normalize = make_normalize(config, None)
    expected = normalize(ten_crop(square, 48))
    seen = set()
    for _ in range(200):
        out = pipeline(image)
        (match,) = [i for i in range(10) if torch.allclose(out, expected[i], atol=1e-6)]
        seen.add(match)
    assert seen == set(range(10))
    evaluation = eval_preprocess(config)
    assert evaluation.rescale(image).shape == (3, 64, 64)  # its ten test crops: same square
