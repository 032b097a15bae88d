"""The one TOML loader and error describer: the appliance's config, the source agent's, the witness's.

Every file hotsite reads is TOML validated by a pydantic model, and every
mistake is reported the same way: ``<key path as written>: <value>: <what is
expected>``, all of them at once, an unknown key with the keys known there.
"""

from __future__ import annotations

import tomllib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union

from pydantic import BaseModel, ValidationError

from appliance.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read(path: Path, what: str) -> dict[str, Any]:
    """The TOML document in ``path``; ConfigError naming ``what`` and the file when it cannot be had."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", [f"TOML syntax: {exc}"]) from None


def validate(model: type[M], data: dict[str, Any], source: str, what: str = "configuration") -> M:
    """``data`` as ``model``; ConfigError listing every problem, described by :func:`describe`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [describe(err, model) for err in exc.errors(include_url=False)]
        raise ConfigError(f"{source}: {len(problems)} problem(s) in the {what}", problems) from None


def describe(err: Any, root: type[BaseModel]) -> str:
    """One pydantic error as the user reads it: the key path as written, the value, what is expected."""
    parts, model = _walk(err["loc"], root)
    where = ".".join(parts) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, parent_model = _walk(err["loc"][:-1], root)
        known = sorted(parent_model.model_fields) if _is_model(parent_model) else []
        hint = f" (known keys here: {', '.join(known)})" if known else ""
        return f"{where}: unknown key{hint}"
    if kind == "missing":
        return f"{where}: required key is missing"
    message = err["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
    if kind == "union_tag_invalid":
        return f"{where}.type: {err['input'].get('type')!r}: {message}"
    if isinstance(err.get("input"), dict):
        return f"{where}: {message}"
    return f"{where}: {_show(err.get('input'))}: {message}"


def _walk(loc: Iterable[Any], root: type[BaseModel]) -> tuple[list[str], Any]:
    """Follow an error location through the schema.

    Returns the key path as the user wrote it (pydantic inserts the tag of a
    discriminated union, e.g. ``channels.sms.gsm.baud``; the file says
    ``channels.sms.baud``) and the annotation found at its end.
    """
    parts: list[str] = []
    model: Any = root
    for part in loc:
        if part == "[key]":  # pydantic's marker for an invalid table name
            continue
        if isinstance(model, _Tagged):
            model = model.by_tag(str(part))
            continue
        if isinstance(part, int) and parts:
            parts[-1] += f"[{part}]"
        else:
            parts.append(str(part))
        model = _descend(model, part) if model is not None else None
    return parts, model


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _descend(annotation: Any, part: Any) -> Any:
    annotation = _unwrap(annotation)
    if _is_model(annotation):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field else None
    origin = typing.get_origin(annotation)
    if origin in (dict, list):
        inner = _unwrap(typing.get_args(annotation)[-1])
        members = _union_members(inner)
        if len(members) > 1:
            # A discriminated union keyed by "type": the error loc names the tag next.
            return _Tagged(members)
        return inner
    return None


class _Tagged:
    def __init__(self, members: list[Any]) -> None:
        self.members = members

    def by_tag(self, tag: str) -> Any:
        for member in self.members:
            field = member.model_fields.get("type")
            if field is not None and tag in typing.get_args(field.annotation):
                return member
        return None


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    members = _union_members(annotation)
    non_none = [m for m in members if m is not type(None)]
    if len(members) > 1 and len(non_none) == 1:
        return _unwrap(non_none[0])
    return annotation


def _union_members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]
