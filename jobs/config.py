"""One pydantic config per job: loadable from YAML, every field overridable by a CLI flag.

``add_config_flags(parser, JobConfig)`` turns each field into a flag (``batch_size`` ->
``--batch-size``, nested ``model.device`` -> ``--model.device``); ``build_config`` merges
defaults < YAML file (``--config job.yaml``) < flags given on the command line.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound=BaseModel)


class JobConfig(BaseModel):
    """Base for job configs: unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """A job config could not be built; the message names the file/flag and the field."""


class RepeatedFlag(Exception):
    """A flag that takes one value was given twice (``--image-column a --image-column b``):
    argparse would keep the last one silently."""


def _given_once(action_cls: type[argparse.Action]) -> type[argparse.Action]:
    """``action_cls`` refusing a second use of its flag: the namespace holds something other
    than the flag's default (SUPPRESS: nothing at all) only once the flag was given."""

    class GivenOnce(action_cls):
        def __call__(self, parser, namespace, values, option_string=None):
            earlier = getattr(namespace, self.dest, self.default)
            if earlier is not self.default:
                raise RepeatedFlag(
                    f"{self.option_strings[0]} given twice ({earlier!r}, then "
                    f"{option_string}{'' if values is None else f' {values!r}'}); it takes "
                    "one value, so give it once")
            super().__call__(parser, namespace, values, option_string)

    GivenOnce.__name__ = f"{action_cls.__name__}GivenOnce"
    return GivenOnce


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _flag_name(path: tuple[str, ...]) -> str:
    return "--" + ".".join(part.replace("_", "-") for part in path)


def _iter_fields(model_cls: type[BaseModel], prefix: tuple[str, ...] = ()):
    for name, field in model_cls.model_fields.items():
        annotation = _unwrap_optional(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _iter_fields(annotation, prefix + (name,))
        else:
            yield prefix + (name,), annotation, field


def group_of(model_cls: type[BaseModel], name: str) -> tuple[str, int, int]:
    """Where a field goes in ``--help``: (the ``group_title`` of the option group that
    declares it, see :mod:`iqray.pipeline.options`, or '' for the job's own options; that
    group's place among the job's bases; the field's place in it)."""
    for depth, cls in enumerate(model_cls.__mro__):
        declared = list(cls.__dict__.get("__annotations__", {}))
        title = cls.__dict__.get("group_title")
        if name in declared and title:
            return title, depth, declared.index(name)
    for depth, cls in enumerate(model_cls.__mro__):  # redeclared by the job: the group's
        title = cls.__dict__.get("group_title")
        if title and name in cls.__dict__.get("__annotations__", {}):
            return title, depth, 0
    own = list(model_cls.__dict__.get("__annotations__", {}))
    return "", 0, own.index(name) if name in own else len(own)


def add_config_flags(parser: argparse.ArgumentParser, model_cls: type[BaseModel],
                     positionals: tuple[str, ...] = (), job: str = "") -> None:
    """Flags for every field, in ``--help`` sections by option group; fields named in
    ``positionals`` may also be given bare (``iqray score IN OUT``), either way."""
    from iqray.pipeline.options import GROUP_ORDER

    parser.add_argument("--config", type=Path, default=None, action=_given_once(
                            argparse._StoreAction),
                        help="YAML file with the job config; flags override its values")
    for name in positionals:
        parser.add_argument(f"pos:{name}", metavar=name.upper(), nargs="?",
                            default=argparse.SUPPRESS,
                            help=f"same as --{name.replace('_', '-')}")
    fields = list(_iter_fields(model_cls))
    places = {path: group_of(model_cls, path[0]) for path, _, _ in fields}
    own = f"{job} options" if job else "options"
    order = [t for t in GROUP_ORDER if t in {p[0] for p in places.values()}] + [""]
    sections = {title: parser.add_argument_group(title or own) for title in order}

    def place(item) -> tuple[int, int, int]:
        title, depth, index = places[item[0]]
        return order.index(title), depth, index

    for path, annotation, field in sorted(fields, key=place):
        target = sections[places[path][0]]
        dest = "cfg:" + ".".join(path)
        help_text = field.description or ""
        if field.is_required():
            help_text += " (required)"
        else:
            default = field.get_default(call_default_factory=True)
            if default is not None and not isinstance(default, BaseModel):
                help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS,
                                  "help": help_text.strip()}
        origin = typing.get_origin(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif origin in (list, tuple):
            kwargs["nargs"] = "+"
            (item,) = typing.get_args(annotation)[:1] or (str,)
            kwargs["type"] = item if item in (int, float, str) else str
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        elif annotation is Path:
            kwargs["type"] = Path
        else:  # dicts and other structured values: parse the flag as YAML
            kwargs["type"] = yaml.safe_load
        if annotation is not bool and origin is not Literal:
            kwargs["metavar"] = path[-1].upper()  # argparse would show the dest, CFG:...
        kwargs["action"] = _given_once(kwargs.get("action", argparse._StoreAction))
        target.add_argument(_flag_name(path), **kwargs)


def build_config(model_cls: type[C], args: argparse.Namespace) -> C:
    data: dict[str, Any] = {}
    config_file = getattr(args, "config", None)
    if config_file is not None:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {config_file}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: expected a mapping of config fields at the top")
        data = loaded or {}
    for key, value in vars(args).items():
        if key.startswith("pos:"):
            flag = "cfg:" + key[len("pos:"):]
            if flag in vars(args) and vars(args)[flag] != value:
                raise ConfigError(f"{key[4:]} given twice: {value!r} and {vars(args)[flag]!r}")
            key = flag
        if not key.startswith("cfg:"):
            continue
        *parents, leaf = key[len("cfg:"):].split(".")
        target = data
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        source = f" (from {config_file} and flags)" if config_file else ""
        raise ConfigError("; ".join(_field_error(error) for error in exc.errors()) + source
                          ) from exc


def _field_error(error: dict[str, Any]) -> str:
    """One pydantic error as '--flag: what is wrong (got value)'."""
    path = tuple(str(part) for part in error.get("loc", ()) if not isinstance(part, int))
    where = _flag_name(path) if path else "config"
    message = error.get("msg", "invalid")
    if error.get("type") == "extra_forbidden":
        return f"{'.'.join(path)}: unknown field"
    if error.get("type") == "missing":
        return f"{where}: required"
    value = error.get("input")
    got = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    return f"{where}: {message}{got}"
