from __future__ import annotations

import pytest

import canon
from canon.cli import main
from canon.errors import ConfigError
from canon.registry import Registry, UnknownNameError


def test_registering_a_name_twice_raises() -> None:
    registry = Registry("thing")

    @registry.register()
    def widget() -> None:
        """A widget."""

    with pytest.raises(ValueError, match="already registered"):
        registry.register("widget")(lambda: None)
    assert registry.get("widget").description == "A widget."


def test_unknown_model_lists_close_matches() -> None:
    with pytest.raises(UnknownNameError, match="resnet50"):
        canon.create_model("resnet5O")


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_num_classes_must_be_a_positive_integer(bad) -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        canon.create_model("resnet20", num_classes=bad)


def test_list_models_filters_by_pattern() -> None:
    names = canon.list_models("vgg*")
    assert names and all(n.startswith("vgg") for n in names)
    assert names == sorted(names)


def test_cli_models_and_unknown_error(capsys) -> None:
    main(["models", "resnet*"])
    out = capsys.readouterr().out
    assert "resnet50" in out and "vgg16" not in out
    assert all(len(line.split(maxsplit=1)) == 2 for line in out.splitlines())
    with pytest.raises(SystemExit) as stop:
        main(["summary", "resnet5O"])
    assert stop.value.code == 2
    assert "unknown model 'resnet5O'; did you mean resnet56, resnet50" in capsys.readouterr().err


@pytest.mark.parametrize("verb, kind", [("models", "model"), ("recipes", "recipe")])
def test_cli_listing_a_pattern_that_matches_nothing_is_an_error(capsys, verb, kind) -> None:
    with pytest.raises(SystemExit) as stop:
        main([verb, "zzz*"])
    assert stop.value.code != 0
    assert f"no {kind} matches 'zzz*'" in capsys.readouterr().err
