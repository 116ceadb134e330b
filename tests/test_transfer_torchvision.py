"""canon.transfer.torchvision: torchvision's models, converted, give torchvision's outputs; what
cannot be converted faithfully is refused; the weights' metadata becomes canon's preprocessing
and class ids. Offline: torchvision's models are built with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

import canon.files
from canon.cli import main
from canon.data.normalize import make_normalize
from canon.engine.checkpoint import export_model, model_info
from canon.engine.setup import build_model
from canon.engine.trained import load_trained
from canon.errors import ConfigError, DataError
from canon.evaluation.protocols import preprocess_for
from canon.models.base import IMAGENET_MEAN, IMAGENET_STD
from canon.models.factory import list_models
from canon.transfer import torchvision as transfer
from canon.transfer.runs import finetune_recipe


def randomized(model: nn.Module) -> nn.Module:
    """`model` in eval mode with BN statistics, affine parameters and biases away from their
    initial values, so that the test sees whether they are copied."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.5, 0.5, generator=generator)
                module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,))))
            elif isinstance(module, nn.Conv2d | nn.Linear) and module.bias is not None:
                module.bias.uniform_(-0.1, 0.1, generator=generator)
    return model.eval()


def assert_converts(tv_model: nn.Module, canon_name: str, size: int, batch: int = 2) -> nn.Module:
    model = transfer.from_torchvision(tv_model, canon_name).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = tv_model(x), model(x)
    assert expected.abs().max() > 0.01  # far above assert_close's tolerance
    torch.testing.assert_close(actual, expected)
    counts = [sorted(int(b) for b in m.buffers() if b.dtype == torch.long)
              for m in (model, tv_model)]
    assert counts[0] == counts[1]  # num_batches_tracked too
    return model


@pytest.mark.parametrize(("tv_name", "canon_name", "size", "batch"), [
    ("resnet18", "resnet18", 64, 2),
    ("resnet50", "resnet50_v1_5", 64, 2),
    ("vgg11", "vgg11", 224, 1),  # the FC head takes 224 only
    ("alexnet", "alexnet_owt", 224, 1),
])
def test_converted_model_gives_torchvisions_outputs(
    tv_name: str, canon_name: str, size: int, batch: int
) -> None:
    options = {"init_weights": False} if tv_name.startswith("vgg") else {}  # faster to build
    tv_model = randomized(tvm.get_model(tv_name, weights=None, num_classes=10, **options))
    model = assert_converts(tv_model, canon_name, size, batch)
    assert model.forward_head(model.forward_features(torch.zeros(1, 3, size, size))).shape[1] == 10


@pytest.mark.parametrize("aux_logits", [False, True])
def test_googlenet_converts_with_its_aux_heads(aux_logits: bool) -> None:
    tv_model = randomized(tvm.googlenet(weights=None, aux_logits=aux_logits, init_weights=False,
                                        transform_input=False, num_classes=10))
    model = assert_converts(tv_model, "googlenet_bn", 112)
    assert len(model.aux_classifiers()) == (2 if aux_logits else 0)
    if aux_logits:  # at maps other than 14x14 both heads pool adaptively to 4x4
        features = torch.randn(2, 512, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(model.aux1(features), tv_model.aux1(features))


def test_googlenet_transform_input_becomes_the_preprocessing() -> None:
    tv_model = randomized(tvm.googlenet(weights=None, aux_logits=False, init_weights=False,
                                        transform_input=True))
    with pytest.raises(ConfigError, match="transform_input=False"):
        transfer.from_torchvision(tv_model, "googlenet_bn")
    tv_model.transform_input = False
    model = transfer.from_torchvision(tv_model, "googlenet_bn").eval()
    tv_model.transform_input = True
    pixels = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    imagenet = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(3, 1, 1)
    preprocess = transfer.preprocess_of(tvm.GoogLeNet_Weights.IMAGENET1K_V1)
    with torch.no_grad():
        expected, actual = tv_model(imagenet), model(preprocess.normalize(pixels))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_paper_resnet50_is_refused() -> None:
    with pytest.raises(ConfigError, match="convert to resnet50_v1_5"):
        transfer.from_torchvision(tvm.resnet50(weights=None), "resnet50")


def test_mismatches_are_named() -> None:
    tv_model = tvm.resnet18(weights=None)
    tv_model.layer2[0].conv1.stride = (1, 1)
    with pytest.raises(ConfigError, match=r"layer2\.0\.conv1 has stride=\(1, 1\), canon's "
                                          r"conv3_x\.0\.conv1 stride=\(2, 2\)"):
        transfer.from_torchvision(tv_model, "resnet18")
    shapes = (r"canon's conv2_x\.0\.conv1\.weight is \(64, 64, 1, 1\), "
              r"torchvision's layer1\.0\.conv1\.weight \(64, 64, 3, 3\)")
    with pytest.raises(ConfigError, match=shapes):
        transfer.from_torchvision(tvm.resnet18(weights=None), "resnet50_v1_5")
    with pytest.raises(ConfigError, match="features have 13 layers, canon's 15"):
        transfer.from_torchvision(tvm.alexnet(num_classes=10), "alexnet")  # the paper's: LRN
    with pytest.raises(ConfigError, match="supported: ResNet, VGG"):
        transfer.from_torchvision(tvm.squeezenet1_0(weights=None), "resnet18")


def test_edits_to_torchvision_s_model_that_copying_cannot_see_are_refused() -> None:
    """A pool replaced by a module without tensors (a usual edit for small images) leaves every
    tensor to copy, and other outputs; a replaced classifier is no Linear layer to size."""
    for edit in (lambda m: setattr(m, "maxpool", nn.Identity()),
                 lambda m: setattr(m, "avgpool", nn.AdaptiveMaxPool2d(1))):
        tv_model = tvm.resnet18(num_classes=5).eval()
        edit(tv_model)
        with pytest.raises(ConfigError, match=r"ResNet -> resnet18: the outputs differ by up to "
                                              r".* a module without tensors"):
            transfer.from_torchvision(tv_model, "resnet18")
        assert not tv_model.training  # the caller's model as it was
    tv_model = tvm.vgg11(num_classes=5)
    tv_model.classifier[-1] = nn.Sequential(nn.Dropout(0.2), nn.Linear(4096, 3))
    with pytest.raises(ConfigError, match=r"VGG -> vgg11: its classifier is a Sequential, "
                                          "canon's a Linear layer"):
        transfer.from_torchvision(tv_model, "vgg11")


def test_default_canon_names() -> None:
    assert transfer.default_canon_name("resnet18") == "resnet18"
    assert transfer.default_canon_name("resnet50") == "resnet50_v1_5"
    assert transfer.default_canon_name("vgg16_bn") == "vgg16_bn"
    assert transfer.default_canon_name("alexnet") == "alexnet_owt"
    assert transfer.default_canon_name("googlenet") == "googlenet_bn"
    assert set(transfer.CANON_NAMES.values()) <= set(list_models())
    with pytest.raises(ConfigError, match="supported: resnet18, resnet34, resnet50"):
        transfer.default_canon_name("inception_v3")


def test_preprocess_from_the_weights_metadata() -> None:
    preprocess = transfer.preprocess_of(tvm.ResNet50_Weights.IMAGENET1K_V2)
    assert (preprocess.crop_size, preprocess.resize_size) == (224, 232)
    assert preprocess.interpolation == "bilinear"
    torch.testing.assert_close(preprocess.normalize.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(preprocess.normalize.std.flatten(), torch.tensor(IMAGENET_STD))
    googlenet = transfer.preprocess_of(tvm.GoogLeNet_Weights.IMAGENET1K_V1)
    assert googlenet.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    # VGG's test scales {S - 32, S, S + 32}: a multi-scale protocol had one scale before.
    assert transfer.preprocess_of(tvm.VGG16_Weights.IMAGENET1K_V1).scales == (224, 256, 288)
    assert preprocess.scales == (232, 264)  # 200 is under the crop


def test_weights_by_name() -> None:
    assert transfer.weights_of("resnet50", "DEFAULT") is tvm.ResNet50_Weights.IMAGENET1K_V2
    assert transfer.weights_of("resnet50", "IMAGENET1K_V1") is tvm.ResNet50_Weights.IMAGENET1K_V1
    full = transfer.weights_of("resnet50", "ResNet50_Weights.IMAGENET1K_V1")
    assert full is tvm.ResNet50_Weights.IMAGENET1K_V1
    for wrong in ("IMAGENET1K_V3", "ResNet18_Weights.IMAGENET1K_V1"):
        with pytest.raises(ConfigError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
            transfer.weights_of("resnet50", wrong)
    with pytest.raises(ConfigError, match="without a trained classifier"):
        transfer.load_torchvision("vgg16", "IMAGENET1K_FEATURES")


def test_imagenet_wnids_in_class_index_order() -> None:
    wnids = transfer.imagenet_wnids()
    assert len(set(wnids)) == len(wnids) == 1000
    assert (wnids[0], wnids[-1]) == ("n01440764", "n15075141")
    assert list(wnids) == sorted(wnids)
    imagenette = {"n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491,
                  "n03028079": 497, "n03394916": 566, "n03417042": 569, "n03425413": 571,
                  "n03445777": 574, "n03888257": 701}  # tench .. parachute
    assert {wnid: wnids.index(wnid) for wnid in imagenette} == imagenette
    categories = tvm.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    assert (categories[0], categories[217], categories[701]) == (
        "tench", "English springer", "parachute")


@pytest.fixture
def offline_torchvision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                        ) -> tuple[list, dict]:
    """Everything but the download: torchvision's builder returns random weights here, and
    each fetch (url, destination, algorithm, published hash) and build are recorded."""
    built, build = {}, tvm.get_model
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fetched = []

    def download(url: str, destination: Path, **check: str) -> None:
        fetched.append((url, destination, check["algorithm"], check["published"]))
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(b"weights")

    def get_model(name: str, weights: object, **options: object) -> nn.Module:
        built.update(name=name, weights=weights, **options)
        return build(name, weights=None, **options)

    monkeypatch.setattr(transfer.tvm, "get_model", get_model)
    monkeypatch.setattr(transfer, "download", download)
    return fetched, built


def test_load_torchvision(offline_torchvision: tuple[list, dict], tmp_path: Path) -> None:
    fetched, built = offline_torchvision
    loaded = transfer.load_torchvision("resnet18")
    url = tvm.ResNet18_Weights.IMAGENET1K_V1.url
    # to torch.hub's cache, checked against the sha256 prefix its name carries
    assert fetched == [(url, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth",
                        "sha256", "f37072fd")]
    transfer.load_torchvision("resnet18")
    assert len(fetched) == 1  # the cached file is used
    assert built == {"name": "resnet18", "weights": tvm.ResNet18_Weights.IMAGENET1K_V1}
    assert (loaded.model_name, loaded.weights) == ("resnet18", "ResNet18_Weights.IMAGENET1K_V1")
    assert not loaded.model.training
    assert loaded.classes[0] == "tench" and loaded.class_ids[0] == "n01440764"
    assert len(loaded.classes) == len(loaded.class_ids) == 1000
    assert (loaded.preprocess.crop_size, loaded.preprocess.resize_size) == (224, 256)


def test_torchvision_weights_are_evaluated_with_their_own_preprocessing(
    offline_torchvision: tuple[list, dict]
) -> None:
    """canon.evaluate(model, ...) without preprocess= takes the weights' constants, as the
    CLI does (GoogLeNet's 0.5 mean, not its class's ImageNet one)."""
    trained = load_trained("torchvision:googlenet")
    assert preprocess_for(trained.model) is trained.preprocess
    assert trained.preprocess.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]


def test_torchvision_weights_evaluated_without_data_are_told_to_name_imagenet(
    offline_torchvision: tuple[list, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    """Their "imagenet" is no folder that moved: canon cannot download ImageNet."""
    with pytest.raises(SystemExit):
        main(["eval", "torchvision:resnet18", "--device", "cpu"])
    error = capsys.readouterr().err
    assert "pass --data /path/to/imagenet" in error and "not there any more" not in error


def test_weights_that_cannot_be_fetched_or_read_are_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Offline (the download fails), or a damaged file in torch's cache: one error naming the
    address or the file, and what to do."""
    import urllib.error
    import urllib.request

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url: str, *args: object, **options: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    url = tvm.ResNet18_Weights.IMAGENET1K_V1.url
    with pytest.raises(DataError, match=f"cannot download .* from {url} .*go online once"):
        transfer.load_torchvision("resnet18")
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True, exist_ok=True)  # torch.hub made it
    cached.write_bytes(b"\xa9 cut short")
    with pytest.raises(DataError, match=f"{cached}, the cached file of .* is unreadable"):
        transfer.load_torchvision("resnet18")

    def out_of_memory(*args: object, **options: object) -> None:
        raise MemoryError

    monkeypatch.setattr(tvm, "get_model", out_of_memory)  # not the file's fault: as it is
    with pytest.raises(MemoryError):
        transfer.load_torchvision("resnet18")


def test_a_download_that_gets_no_answer_stops_at_the_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Behind a proxy that takes the connection and never answers, torch.hub's download waited
    for good: canon's download stops at its timeout, naming the address, and leaves the
    process's default socket timeout alone."""
    import socket
    import time
    import urllib.request

    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the backlog), never answers
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for variable in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen's opener reads the proxies once, when first used: an earlier test's is stale
    monkeypatch.setattr(urllib.request, "_opener", None)
    monkeypatch.setattr(canon.files, "DOWNLOAD_TIMEOUT", 1)
    real_urlopen, asked = urllib.request.urlopen, []

    def urlopen(url: str, **options: float) -> object:  # as it is called: what it is given
        asked.append((options["timeout"], socket.getdefaulttimeout()))
        return real_urlopen(url, **options)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    started = time.perf_counter()
    url = tvm.ResNet18_Weights.IMAGENET1K_V1.url
    try:
        with pytest.raises(DataError, match=f"cannot download .* from {url} .*timed out"):
            transfer.load_torchvision("resnet18")
    finally:
        silent.close()
    assert time.perf_counter() - started < 30
    assert asked == [(1, None)]  # the connection's own timeout; the process's untouched


def test_a_googlenet_without_aux_heads_loads_back_from_its_export(tmp_path: Path) -> None:
    """torchvision's pretrained GoogLeNet has no auxiliary heads, nor then a linear probe of
    it: its export says so, and loads back into the same model."""
    tv_model = randomized(tvm.googlenet(weights=None, aux_logits=False, init_weights=False,
                                        transform_input=False))
    model = transfer.from_torchvision(tv_model, "googlenet_bn").eval()
    classes = [str(i) for i in range(1000)]
    export_model(tmp_path, model, None, model_info("googlenet_bn", model, 1000, classes, classes,
                                                   {"dataset": "imagenet"}))
    assert json.loads((tmp_path / "eval_config.json").read_text())["model_options"] == {
        "aux_logits": False}
    loaded = load_trained(tmp_path).model
    assert loaded.aux_classifiers() == []
    images = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    # Fine-tuned, it keeps its architecture: no fresh auxiliary heads trained beside it.
    recipe = finetune_recipe(load_trained(tmp_path), str(tmp_path), "/data/flowers")
    assert recipe.model.options == {"aux_logits": False}
    assert recipe.data.normalization_from is None  # its run stored none: computed anew
    assert build_model(recipe, 5).aux_classifiers() == []


@pytest.mark.parametrize(("name", "mean"), [("resnet18", "imagenet"), ("googlenet", "inception")])
@pytest.mark.usefixtures("random_torchvision")
def test_finetuning_keeps_the_weights_normalisation(name: str, mean: str) -> None:
    """Fine-tuning torchvision's weights normalises the new images with the constants the
    weights were trained with (GoogLeNet's 0.5), not with the new dataset's own statistics."""
    source = load_trained(f"torchvision:{name}")
    recipe = finetune_recipe(source, f"torchvision:{name}", "/data/flowers")
    assert (recipe.data.mean, recipe.data.divide_std) == (mean, True)
    normalize, theirs = make_normalize(recipe.data, None), source.preprocess.normalize
    assert torch.equal(normalize.mean, theirs.mean) and torch.equal(normalize.std, theirs.std)
