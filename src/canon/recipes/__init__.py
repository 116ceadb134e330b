"""The papers' training recipes: one YAML file per setting, validated into a `Recipe`.

A recipe file may start from another with `base: NAME` (files named `_*.yaml` are bases and
are not listed); its own keys override the base's, section by section. `load_recipe` takes a
registered name or a path to a YAML file, plus `--set section.key=value` overrides.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shlex
import warnings
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from canon.errors import ConfigError, DataError
from canon.recipes.schema import (
    SCHEDULE_KIND_KEYS,
    SECTIONS,
    Recipe,
    ScheduleSection,
    valid_keys,
)
from canon.registry import Registry

RECIPES = Registry("recipe")
# Settings over a recipe's: "section.key=value" strings, (key, value) pairs, or a mapping.
Overrides = Iterable[str | tuple[str, Any]] | Mapping[str, Any]
RECIPE_DIR = Path(__file__).resolve().parent
# The first line of the recipe.yaml a run writes (canon.engine.setup), then canon's version
# and commit: the resolved recipe, every key written, read or not.
RECIPE_HEADER = "# the resolved recipe of this run: "


class _RecipeLoader(yaml.SafeLoader):
    """YAML as people write it today: PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as
    a string, `010` as 8 (octal), `1:30` as 90 (base 60) and yes/no/on/off as booleans;
    YAML 1.2, which every other reader follows, takes them as 0.001, 10 and strings. A key
    twice in one mapping is an error (YAML forbids it; PyYAML keeps the later silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        # Keys as written (a recipe's keys are plain words): not constructed twice, and an
        # unhashable key is left to PyYAML's own error.
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key_node.value!r} appears twice in one mapping",
                    key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node).replace("_", "")
        return int(text, 0 if text.lstrip("+-")[:2].lower() in ("0x", "0o") else 10)


_BOOL, _INT, _FLOAT = (f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float"))
# YAML 1.2's core schema for booleans and numbers in place of 1.1's (an int before a float:
# the first pattern that matches a plain scalar names its kind).
_YAML_1_2 = (
    (_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    (_INT, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7][0-7_]*|0x[0-9a-fA-F][0-9a-fA-F_]*)$"),
     list("-+0123456789")),
    (_FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
                        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
     list("-+.0123456789")),
)
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in _YAML_1_2:
    _RecipeLoader.add_implicit_resolver(_tag, _pattern, _first)
_RecipeLoader.add_constructor(_INT, _RecipeLoader.construct_yaml_int)


class _RecipeDumper(yaml.SafeDumper):
    """Quotes a string that YAML 1.1 or 1.2 would read as another kind ("09", "off"), so that
    recipe.yaml reads back as written, by canon and by any other reader."""


for _tag, _pattern, _first in _YAML_1_2:
    _RecipeDumper.add_implicit_resolver(_tag, _pattern, _first)


def dump_yaml(value: object, **options: Any) -> str:
    """`yaml.safe_dump` whose output parse_yaml reads back as `value` (_RecipeDumper)."""
    return yaml.dump(value, Dumper=_RecipeDumper, **options)


def parse_yaml(text: str) -> object:
    """`yaml.safe_load` with YAML 1.2's numbers and booleans (_RecipeLoader)."""
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: builds no Python objects

__all__ = [
    "RECIPES", "RECIPE_HEADER", "Recipe", "apply_overrides", "dump_yaml", "flag_overrides",
    "flat_values", "list_recipes", "load_recipe", "overridden_keys", "show_recipe",
]


def flat_values(values: dict[str, Any]) -> dict[str, Any]:
    """A recipe mapping as section.key: value (top-level values under their own name)."""
    flat: dict[str, Any] = {}
    for section, value in values.items():
        if isinstance(value, dict):
            flat.update({f"{section}.{key}": item for key, item in value.items()})
        else:
            flat[section] = value
    return flat


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A recipe file's mapping; a one-line error naming the file when it is missing, not
    UTF-8, not YAML or not a mapping."""
    try:
        values = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"recipe file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"recipe file {path} is a folder; name a .yaml file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); "
                          "save the recipe as UTF-8") from None
    except OSError as error:
        raise DataError(f"recipe file {path}: cannot read it ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path.name}: not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path.name}: a recipe must be a YAML mapping of sections (`train:` "
                          f"and its keys indented below it, as the bundled recipes are "
                          f"written), got {values!r}")
    return values


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's several-line message in one: where (line and column in the file) and what."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(error).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override`'s values, mapping into mapping key by key. A mapping given as
    null (`train:` with every key commented out) changes nothing: it does not drop the base's
    keys, which would bring back canon's defaults unnoticed."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(merged.get(key), dict) and (value is None or isinstance(value, dict)):
            merged[key] = _merge(merged[key], value or {})
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _base_path(path: Path, base: str) -> Path:
    """The recipe a file's `base: NAME` names: NAME.yaml beside it, else the bundled one (a
    user's recipe may build on resnet50); a file name or path (.yaml), from the file's folder,
    as --recipe takes one."""
    if str(base).endswith((".yaml", ".yml")):
        named = path.parent / base  # an absolute path stays as it is
        if named.is_file():
            return named
        raise ConfigError(f"{path.name}: base recipe file {named} does not exist")
    for folder in (path.parent, RECIPE_DIR):
        if (folder / f"{base}.yaml").is_file():
            return folder / f"{base}.yaml"
    raise ConfigError(f"{path.name}: base recipe {base!r} is neither beside it "
                      f"({path.parent / f'{base}.yaml'}) nor bundled (canon recipes)")


def _raw_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping with its `base:` chain resolved (_base_path)."""
    path = path.resolve()  # `base: ../r/b` names the file b.yaml does, however it is written
    if path in seen:
        raise ConfigError(f"{path.name}: `base:` chain loops: {' -> '.join(p.name for p in seen)}")
    values = read_yaml_mapping(path)
    base = values.pop("base", None)
    merged = values
    if base is not None:
        base_path = _base_path(path, base)
        base_values = _raw_recipe(base_path, (*seen, path))
        own, inherited = (values.get("train"), base_values.get("train"))
        if isinstance(own, dict) and isinstance(inherited, dict):
            _check_epochs_count(own, own.get("epochs"), inherited.get("iterations"),
                                f"{path.name}: ", f"its base {base_path.name}",
                                "add `iterations: null` under train")
        merged = _merge(base_values, values)
        model = values.get("model")
        if isinstance(model, dict) and model.get("options") == {}:  # as --set model.options={}:
            merged["model"]["options"] = {}  # the one way to drop a base's build options
    own, schedule = values.get("schedule"), merged.get("schedule")
    # Not in a run's recipe.yaml, which writes every key; a malformed section is from_dict's.
    if isinstance(own, dict) and isinstance(schedule, dict) and run_header(path) is None:
        kind = schedule.get("kind", ScheduleSection.kind)
        for key, readers in _unread_schedule_keys(own, kind):
            warnings.warn(f"{path.name}: schedule.{key}: a {kind} schedule does not read it "
                          f"(only {readers}); set its kind, or drop it", stacklevel=2)
    return merged


def run_header(recipe: Path) -> str | None:
    """The first line of a recipe.yaml a run wrote (RECIPE_HEADER...); None for another
    file, or none."""
    try:
        with recipe.open(encoding="utf-8", errors="replace") as file:
            first = file.readline()
    except OSError:
        return None
    return first if first.startswith(RECIPE_HEADER) else None


def _unread_schedule_keys(values: Mapping[str, Any], kind: object) -> list[tuple[str, str]]:
    """(key, the kinds that read it) of the schedule `values` set that a `kind` schedule
    ignores; not those set to their default (`milestones: []` clears a base's)."""
    defaults = {field.name: field.default for field in dataclasses.fields(ScheduleSection)}
    return [(key, ", ".join(SCHEDULE_KIND_KEYS[key])) for key, value in sorted(values.items())
            if kind not in SCHEDULE_KIND_KEYS.get(key, (kind,))
            and (tuple(value) if isinstance(value, list) else value) != defaults.get(key)]


def _check_epochs_count(keys_set: Iterable[str], epochs: Any, iterations: Any, where: str,
                        beneath: str, fix: str) -> None:
    """A layer (a file over its base, overrides over a recipe) that sets train.epochs, not
    train.iterations, over an iteration limit from beneath: the limit wins, and the epochs
    would count for nothing unnoticed."""
    if "epochs" in keys_set and "iterations" not in keys_set and iterations is not None:
        raise ConfigError(f"{where}train.epochs {epochs} would count for nothing: {beneath} runs "
                          f"train.iterations {iterations}, which takes precedence; {fix}")


def load_recipe_file(path: str | Path) -> Recipe:
    path = Path(path)
    values = _raw_recipe(path)
    try:
        return Recipe.from_dict(values, where=path.name)
    except ConfigError as error:
        raise ConfigError(f"{error}{_top_level_hint(path, values)}"
                          f"{_set_by_bases(path, str(error))}") from None


def _top_level_hint(path: Path, values: dict[str, Any]) -> str:
    """Where a recipe's unknown top-level keys belong: a section's key written at the top
    level (`lr:`, optimizer's), or else, for a file without one, `base:`."""
    unknown = [key for key in values if key not in valid_keys()]
    homes = [f"{key} is a key of {section}: indent it under `{section}:`"
             for key in unknown for section in SECTIONS if key in valid_keys(section)]
    if homes:
        return "; " + "; ".join(homes)
    if unknown and "base" not in read_yaml_mapping(path):
        return "; a file may also start from another with base: RECIPE"
    return ""


def _set_by_bases(path: Path, message: str) -> str:
    """Which base files set the keys an error about the merged recipe names (" (base recipe
    mid.yaml sets optimizer.lr)"), or "" when the file itself sets them all: the error starts
    with the file that was loaded, and the fix may belong in one of its bases. The list of
    valid keys that ends an unknown-key error names no culprit."""
    chain = _base_chain(path)
    setters: dict[str, Path] = {}
    for file in reversed(chain):  # bases first: a file's own keys override them
        for section, key in _set_keys(read_yaml_mapping(file)):
            setters[f"{section}.{key}" if section else key] = file
    problem = message.split("; valid keys in ")[0]
    by_file: dict[Path, list[str]] = {}
    for word in dict.fromkeys(re.findall(r"[A-Za-z_](?:[\w.]*\w)?", problem)):
        if setters.get(word, chain[0]) != chain[0]:
            by_file.setdefault(setters[word], []).append(word)
    blamed = "; ".join(f"base recipe {file} sets {', '.join(keys)}"
                       for file, keys in by_file.items())
    return f" ({blamed})" if blamed else ""


def _set_keys(values: dict[Any, Any]) -> list[tuple[str | None, str]]:
    """A recipe file's own keys as (section, key), a builder option as (model, options.NAME),
    and its top-level keys that are not sections (`name`, a misspelt section) as (None, key),
    as the YAML parser reads them (flow style too)."""
    keys: list[tuple[str | None, str]] = []
    for key, value in values.items():
        if isinstance(value, dict) and str(key) in valid_keys():
            for name, item in value.items():
                keys.append((str(key), str(name)))
                if isinstance(item, dict):
                    keys += [(str(key), f"{name}.{option}") for option in item]
        elif key != "base":
            keys.append((None, str(key)))
    return keys


def override_key(text: str) -> str:
    """The `section.key` of a `--set section.key=value` item."""
    return text.partition("=")[0].strip()


def flag_overrides(flags: Iterable[tuple[str, str, Any]],
                   overrides: Iterable[str | tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The (key, value) overrides of the command-line flags given, (flag, the key it sets, its
    value or None where not given); a flag given together with a `--set` of the same key
    (overridden_keys) is refused: which should win is not for canon to guess."""
    given = [(flag, key, value) for flag, key, value in flags if value is not None]
    set_keys = overridden_keys(overrides)
    for flag, key, _ in given:
        if key in set_keys:
            raise ConfigError(f"{flag} and --set {key}=... both set {key}: pass one of them")
    return [(key, value) for _, key, value in given]


def overridden_keys(overrides: Iterable[str | tuple[str, Any]]) -> set[str]:
    """Every dotted key that overrides set, as `section.key=value` or inside a mapping value
    (`section={key: value}` sets section.key)."""
    keys = set()
    for override in overrides:
        key, value = ((override_key(override), _parse_override(override)[1])
                      if isinstance(override, str) else override)
        keys |= {key, *_nested_keys(key, value)}
    return keys


def _nested_keys(key: str, value: Any) -> list[str]:
    """The dotted keys a mapping value sets under `key` (`train={epochs: 3}`: train.epochs)."""
    if not isinstance(value, dict):
        return []
    return [nested for name, item in value.items()
            for nested in (f"{key}.{name}", *_nested_keys(f"{key}.{name}", item))]


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, (_, sep, value) = override_key(text), text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.epochs=10")
    try:
        parsed = parse_yaml(value) if value.strip() else None
        comment = _comment_start(value)
    except yaml.YAMLError:
        return key.split("."), value
    if comment is not None:  # a value on a command line has no comment: the '#' is meant
        quoted = (f" to keep it: --set {shlex.quote(f'{key}={json.dumps(value.strip())}')}"
                  if parsed is None or isinstance(parsed, str) else "")
        raise ConfigError(f"override {text!r}: YAML reads {value[comment:].strip()!r} as a comment "
                          f"and drops it; quote the string that holds the '#'{quoted}")
    return key.split("."), parsed


def _comment_start(value: str, spans: list[tuple[int, int]] | None = None,
                   offset: int = 0) -> int | None:
    """Where the first '#' that YAML reads as starting a comment stands in `value`: one outside
    every scalar, tag or anchor (a '#' inside `a#b` or a quoted string is text). `spans`:
    those of the whole text that `value` starts at `offset` of (_text_spans)."""
    spans = _text_spans(value) if spans is None else spans
    return next((index for index, character in enumerate(value) if character == "#"
                 and not any(start <= offset + index < end for start, end in spans)), None)


def _text_spans(text: str) -> list[tuple[int, int]]:
    """Where in `text` YAML reads its scalars, tags, anchors and aliases."""
    return [(token.start_mark.index, token.end_mark.index)
            for token in yaml.scan(text, Loader=_RecipeLoader)
            if isinstance(token, yaml.ScalarToken | yaml.TagToken | yaml.AnchorToken
                          | yaml.AliasToken)]


def apply_overrides(recipe: Recipe, overrides: Overrides) -> Recipe:
    """A new recipe with settings applied: `"section.key=value"` strings (the value parsed as
    YAML, as `--set` gives them), `("section.key", value)` pairs (as `canon train`'s flags
    give them), or a mapping of such pairs. A mapping value merges into a mapping key by key,
    as a recipe into its base; `model.options.NAME=value` sets one build option,
    `model.options={}` drops them all. A schedule key set that the schedule's kind does not
    read is warned of."""
    if isinstance(overrides, str):  # its characters would be taken for overrides one by one
        raise ConfigError(f"overrides must be a list of 'section.key=value' strings, got the "
                          f"string {overrides!r}: pass [{overrides!r}]")
    if isinstance(overrides, Mapping):  # {"train.epochs": 2}: its keys alone, iterated
        overrides = list(overrides.items())
    values, keys_set = recipe.to_dict(), {"schedule": set(), "train": set()}
    for override in overrides:
        if isinstance(override, str):
            text, (path, value) = override, _parse_override(override)
        else:
            text, path, value = f"{override[0]}={override[1]}", override[0].split("."), override[1]
        if path[0] in keys_set:
            keys_set[path[0]] |= set(path[1:2]) or set(value if isinstance(value, dict) else ())
        target = values
        for depth, part in enumerate(path):
            section = ".".join(path[:depth]) or None
            keys = valid_keys(section) if depth < 2 else []
            if part not in keys and section != "model.options":  # a model's own options
                where = f"section {section}" if section else "a recipe"
                valid = ", ".join(keys) or "(none: a section's keys hold values, but for " \
                    "model.options.NAME)"
                raise ConfigError(f"override {text!r}: {part!r} is not a key of {where}; "
                                  f"valid keys: {valid}")
            if depth == len(path) - 1 and value is None and isinstance(target.get(part), dict):
                key = ".".join(path)  # merged as a file's empty section is: a silent no-op
                drop = "; model.options={} drops them all" if key == "model.options" else ""
                raise ConfigError(f"override {text!r}: {key} is a section, which null leaves "
                                  f"as it is: set its keys ({key}.KEY=value){drop}")
            if depth == len(path) - 1 and path == ["model", "options"] and value == {}:
                target[part] = {}  # the one way to drop a recipe's build options
            elif depth == len(path) - 1:
                target[part] = _merge({part: target.get(part)}, {part: value})[part]
            else:
                target = target.get(part)
                if not isinstance(target, dict):
                    raise ConfigError(f"override {text!r}: {part} is a value, not a section")
    result = Recipe.from_dict(values, where=f"{recipe.name} with the overrides (flags, --set)")
    _check_epochs_count(keys_set["train"], result.train.epochs, result.train.iterations, "",
                        recipe.name, "set train.iterations=null too (canon train --epochs does)")
    kind = result.schedule.kind
    set_values = {key: getattr(result.schedule, key) for key in keys_set["schedule"]}
    for key, readers in _unread_schedule_keys(set_values, kind):
        warnings.warn(f"--set schedule.{key}: a {kind} schedule does not read it (only "
                      f"{readers}); set schedule.kind too, or drop it", stacklevel=2)
    return result


def load_recipe(
    name_or_path: str | Path, overrides: Overrides = ()
) -> Recipe:
    """A registered recipe by name, or a recipe YAML file by path, with overrides applied."""
    return apply_overrides(load_recipe_file(recipe_path(name_or_path)), overrides)


def list_recipes(pattern: str | None = None) -> list[str]:
    return RECIPES.names(pattern)


def recipe_path(name_or_path: str | Path) -> Path:
    """The YAML file of a bundled recipe name, or the given file. A name (a str) is the
    bundled recipe even where the working folder holds a file or folder of that name, as
    `runs/quickstart` is a run's folder; `./NAME` names the local one."""
    text = str(name_or_path)
    if isinstance(name_or_path, str) and text in RECIPES.names():
        return RECIPE_DIR / f"{text}.yaml"
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return Path(text)
    if Path(text).is_dir():
        raise ConfigError(f"{text} is a folder; pass a recipe's name (canon recipes lists "
                          "them) or its YAML file")
    if Path(text).suffix or Path(text).name != text:  # a path, not a name: mine.json, a/b
        raise DataError(f"recipe file {text} does not exist; a recipe is a YAML file "
                        "(.yaml) or a bundled recipe's name (canon recipes lists them)")
    RECIPES.get(text)  # UnknownNameError listing close names
    return RECIPE_DIR / f"{text}.yaml"


def show_recipe(name_or_path: str | Path) -> str:
    """The resolved recipe as YAML, each value with the comment (the paper's citation) of the
    file that sets it, `# (base.yaml)` naming that file when it is a base, and
    `# canon default` for values no file sets."""
    path = recipe_path(name_or_path)
    recipe = load_recipe_file(path)
    notes: dict[tuple[str | None, str], str] = {}
    chain = _base_chain(path)
    for file in reversed(chain):  # bases first: the recipe's own notes win
        comments = _comments(file)
        for key in _set_keys(read_yaml_mapping(file)):  # a comment on a line of its own
            comment = comments.get(key, "")  # file sets (a flow mapping's keys have none)
            notes[key] = f"{comment} ({file.name})".strip() if file != chain[0] else comment
    lines = []
    for section, value in recipe.to_dict().items():
        if not isinstance(value, dict):
            lines.append(_noted(f"{section}: {_flow(value)}", notes.get((None, section))))
            continue
        lines.append(f"{section}:")
        for key, item in value.items():
            note = notes.get((section, key), "canon default")
            readers = SCHEDULE_KIND_KEYS.get(key, ()) if section == "schedule" else ()
            if readers and recipe.schedule.kind not in readers:
                note = f"unused by kind {recipe.schedule.kind} [{note}]"
            if isinstance(item, dict) and item:  # model.options: each option with its own
                lines.append(_noted(f"  {key}:", notes.get((section, key)) or None))
                lines.extend(_noted(f"    {name}: {_flow(value)}",
                                    notes.get((section, f"{key}.{name}"), "")) for name, value
                             in item.items())
                continue
            lines.append(_noted(f"  {key}: {_flow(item)}", note))
    return "\n".join(lines)


def _base_chain(path: Path) -> list[Path]:
    """The file and its `base:` files, the file first (_raw_recipe has checked the chain),
    from where the file really is: a linked recipe's bases are beside the file it links to."""
    chain = [path.resolve()]
    while (base := read_yaml_mapping(chain[-1]).get("base")) is not None:
        chain.append(_base_path(chain[-1], base).resolve())  # a link's bases: beside its target
    return chain


def _comments(path: Path) -> dict[tuple[str | None, str], str]:
    """(section, key) -> the comment on its line and the comment-only lines in the comment
    column right after it ("" for a key the file sets without a comment). A comment-only line
    at a key's indentation (or less) is about what follows, not a continuation."""
    comments: dict[tuple[str | None, str], str] = {}
    section, last, key_indent, parent = None, None, 0, (0, "")
    text = path.read_text(encoding="utf-8")
    spans, offset = _text_spans(text), 0
    for line in text.splitlines(keepends=True):
        cut = _comment_start(line, spans, offset)
        offset += len(line)
        line = line.rstrip("\r\n")
        code, comment = (line, "") if cut is None else (line[:cut], line[cut + 1:].strip())
        if not code.strip():
            if last is not None and comment and len(code) > key_indent:
                comments[last] = f"{comments.get(last, '')} {comment}".strip()
            else:
                last = None
            continue
        key, colon, value = code.partition(":")
        key, key_indent = key.strip(), len(code) - len(code.lstrip())
        if not key_indent and not colon:  # `---`, `...` or a directive: no key
            last = None
            continue
        if not key_indent:
            section = key if not value.strip() else None
            last, parent = (None, key), (0, "")
        elif parent[1] and key_indent > parent[0]:  # a key of a mapping value: options.stem
            last = (section, f"{parent[1]}.{key}")
        else:
            last, parent = (section, key), (key_indent, key)
        comments[last] = comment
    return comments


def _flow(value: Any) -> str:
    return dump_yaml(value, default_flow_style=True, width=10_000).removesuffix(
        "\n...\n").strip()


def _noted(line: str, note: str | None) -> str:
    return f"{line:<40} # {note}" if note else line


def _register_bundled() -> None:
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        description = str(read_yaml_mapping(path).get("description", ""))
        RECIPES.register(path.stem, description=description)(partial(load_recipe_file, path))


_register_bundled()
