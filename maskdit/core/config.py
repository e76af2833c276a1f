"""Config is data: strict pydantic models, loaded from YAML with `key=value` overrides.

Every config class derives from `StrictModel`, so an unknown or mistyped key is an error that
names the key. Defaults equal the paper's; presets live in `maskdit/configs/*.yaml`.

Values mean what they say: files and overrides are read as YAML 1.2 (`yes` and `on` are strings,
`1e-4` a float), a number with a leading zero (`010`: 8 in YAML 1.1, 10 in 1.2) and a key given
twice are errors; an override of a string field keeps the text as typed (`#`, `~` and all); an
error quotes at most a bounded excerpt of the value (a small file of YAML anchors can expand to
gigabytes).
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from maskdit.core.errors import UsageError, UserError

T = TypeVar("T", bound="StrictModel")


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message says which key and what to do."""


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --- YAML 1.2 (core schema) instead of PyYAML's YAML 1.1 ---

_RESOLVED = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:null")
_YAML12 = (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("tag:yaml.org,2002:float", (r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                 r"|[-+]?\.(?:inf|Inf|INF)|\.nan|\.NaN|\.NAN)$"), "-+.0123456789"),
)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars, refusing duplicate keys and ambiguous numbers."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # PyYAML's own check names it
            if key in seen and key != "<<":
                raise ConfigError(f"key {excerpt(key)} is given twice (lines {seen[key].start_mark.line + 1} and "
                                  f"{key_node.start_mark.line + 1}): keep one")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).lstrip("+-")
        if len(text) > 1 and text[0] == "0" and text[1].isdigit():
            raise ConfigError(f"{node.value!r} is ambiguous (octal in YAML 1.1, decimal in YAML 1.2): write it "
                              f"without the leading zero, or 0o{text.lstrip('0') or '0'} for octal")
        value = self.construct_scalar(node)
        sign = -1 if value.startswith("-") else 1
        return sign * int(value.lstrip("+-"), 0)

    def construct_yaml_float(self, node):
        value = self.construct_scalar(node).lower()
        if value.lstrip("+-") == ".inf":
            return float("-inf") if value.startswith("-") else float("inf")
        return float("nan") if value == ".nan" else float(value)


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _RESOLVED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _pattern, _first in _YAML12:
    _Yaml12Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))
_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _Yaml12Loader.construct_yaml_int)
_Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _Yaml12Loader.construct_yaml_float)


def load_yaml(text: str) -> Any:
    """Parse `text` as YAML 1.2 (core schema); duplicate keys and leading-zero numbers raise ConfigError."""
    return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass: no arbitrary objects


_EXCERPT = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxstring, _EXCERPT.maxother = 2, 120, 120
_EXCERPT.maxlist = _EXCERPT.maxtuple = _EXCERPT.maxdict = _EXCERPT.maxset = 4


def excerpt(value: Any) -> str:
    """`repr(value)` cut to a few hundred characters, in time bounded by the cut (not by the value's size)."""
    return _EXCERPT.repr(value)


# --- key=value overrides, typed by the config's fields ---

def _field_type(cls: type | None, dotted: str) -> Any:
    """The annotation of field `dotted` (e.g. "data.uri") in config class `cls`; None when unknown."""
    annotation: Any = cls
    for part in dotted.split("."):
        model = _model_in(annotation)
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
    return annotation


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (`Model`, `Model | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def _is_text(annotation: Any) -> bool:
    """A field whose value is text: str, `str | None`, or a Literal of strings."""
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return len(args) == 1 and _is_text(args[0])
    return False


def parse_value(raw: str, annotation: Any = None) -> Any:
    """One override's value: the text as typed for a string field, else parsed as YAML 1.2. Nothing after
    the `=` is None, except for a string field that cannot be None, where it is the empty string."""
    if not raw.strip():
        return "" if annotation is str else None
    if _is_text(annotation):
        return raw
    try:
        return load_yaml(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"{excerpt(raw)} is not a valid value: {str(error).splitlines()[0]}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...], cls: type | None = None) -> dict[str, Any]:
    """Turn `["optim.lr=1e-4", "model.depth=4"]` into a nested dict.

    With `cls` (the config class) a string field's value is the text as typed; other values (and every
    value without `cls`) are parsed as YAML 1.2. `-x` and `--x` are options, not overrides: refused.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if item.startswith("-"):
            raise ConfigError(f"override {excerpt(item)} starts with '-': overrides are key=value (options such "
                              "as --config go before them)")
        if not sep or not key.strip():
            raise ConfigError(f"override {excerpt(item)} is not of the form key=value (e.g. optim.lr=1e-4)")
        key = key.strip()
        try:
            value = parse_value(raw, _field_type(cls, key))
        except ConfigError as error:
            raise ConfigError(f"override {key}: {error}") from None
        _set_dotted(tree, key, value)
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _explain(error: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - unknown key {where!r}: remove it or check its spelling")
        elif item["type"] == "missing":
            lines.append(f"  - {where}: {item['msg']}")
        else:
            lines.append(f"  - {where}: {item['msg']} (got {excerpt(item.get('input'))})")
    return "\n".join(lines)


def build_config(cls: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    """Validate `data` as `cls`, turning pydantic's error into a `ConfigError` naming each key."""
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_explain(error, source)) from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load `cls` from a YAML file (or defaults when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML file path")
        try:
            loaded = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        except ConfigError as error:
            raise ConfigError(f"config file {str(path)!r}: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top, not {type(loaded).__name__}")
        data, source = loaded, str(path)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides, cls))
        source += " + overrides"
    return build_config(cls, data, source)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: how configs are logged as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def env_seconds(name: str, default: float, *, example: float, zero_ok: bool = False,
                infinite_ok: bool = False) -> float:
    """Seconds from the environment variable `name` (`default` when unset or blank): a number > 0, or >= 0
    with `zero_ok`; infinity only with `infinite_ok`. Anything else is a one-line `UsageError` naming it."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not ((value >= 0 if zero_ok else value > 0) and (infinite_ok or math.isfinite(value))):  # NaN fails both
        raise UsageError(f"{name}={text!r} is not a number of seconds {'>= 0' if zero_ok else '> 0'}; set it to "
                         f"e.g. {example:g}, or unset it")
    return value
