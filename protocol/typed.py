"""Plain data (YAML, environment variables, flags) into a tree of frozen dataclasses.

One loader serves every typed tree of Commons: the swarm manifest and the node config. The field
annotations say what each value must be; a ``Rules`` value says what differs between sources:

- the manifest is strict: a YAML value must already have its field's type, so ``seed: '3'`` is
  refused and two files that describe the same swarm parse to the same tree (and swarm id);
- the node config is loose: environment variables are text, so ``"2"`` is read as the int 2,
  ``"a b"`` or ``"a,b"`` as a tuple of strings and ``"none"`` as None.

Both refuse keys that name no field, booleans where numbers are expected and non-finite
numbers, with one line naming the location, raised as the caller's own error type.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type, TypeVar

T = TypeVar("T")

KeyPath = Tuple[str, ...]  # the keys that lead to a value, as written in the data

NONE_WORDS = ("", "none", "null")  # what loose text may say for an Optional field left unset
INT_LIMIT = 1 << 63  # an int field holds a signed 64-bit value: what JSON readers, msgpack and torch's seeds take


@dataclass(frozen=True)
class Rules:
    """How one source of plain data is read.

    ``error`` builds the exception raised for bad data (given a one-line message). ``loose``: a value
    may be text (or a number) that spells its field's type, as environment variables are; strict: it
    must have that type already, except that a float field also takes an int or a numeric string
    (YAML 1.1 reads ``1e-3`` as a string). ``key`` maps a key of the data to a field name. ``name``
    names a location (its path of keys as written) in messages; ``unknown`` is the message for keys
    of the mapping at a path that name no field, given in the data's order.
    """

    error: Callable[[str], Exception]
    name: Callable[[KeyPath], str]
    unknown: Callable[[KeyPath, List[Any]], str]
    loose: bool = False
    key: Callable[[Any], str] = str


def load(kind: Type[T], data: Any, rules: Rules, path: KeyPath = ()) -> T:
    """Build dataclass ``kind`` (and the dataclasses nested in it) from the mapping ``data``.

    Fields missing from ``data`` keep their defaults; ``kind``'s own ``__post_init__`` checks ranges.
    Raises ``rules.error`` when ``data`` is not a mapping, has unknown keys, or holds a wrong value.
    """
    return kind(**load_fields(kind, data, rules, path))


def load_fields(kind: type, data: Any, rules: Rules, path: KeyPath = ()) -> Dict[str, Any]:
    """The fields ``data`` sets on dataclass ``kind``, by field name, each converted to its field's type.

    For merging several sources before building ``kind`` once. Unknown keys are refused before any value
    is looked at, so a typo is reported as one. Raises ``rules.error`` as ``load`` does.
    """
    if not isinstance(data, Mapping):
        raise rules.error(f"{rules.name(path)} must be a mapping")
    hints = typing.get_type_hints(kind)
    fields = {f.name for f in dataclasses.fields(kind)}
    names = {key: rules.key(key) for key in data}
    unknown = [key for key, name in names.items() if name not in fields]
    if unknown:
        raise rules.error(rules.unknown(path, unknown))
    return {names[key]: _convert(value, hints[names[key]], path + (str(key),), rules) for key, value in data.items()}


def field_kind(hint: Any) -> Tuple[Any, bool]:
    """``(type, many)`` of a field annotation: ``Optional`` dropped, ``Tuple[X, ...]`` is ``(X, True)``."""
    hint, _ = _without_none(hint)
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True
    return hint, False


def _without_none(hint: Any) -> Tuple[Any, bool]:
    """``(X, True)`` for ``Optional[X]`` or ``X | None``, else ``(hint, False)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        return next(a for a in typing.get_args(hint) if a is not type(None)), True
    return hint, False


def _convert(raw: Any, hint: Any, path: KeyPath, rules: Rules) -> Any:
    """``raw`` as a value of annotation ``hint``, or raise ``rules.error`` naming ``path``."""
    if dataclasses.is_dataclass(hint):
        return load(typing.cast(type, hint), raw, rules, path)
    hint, optional = _without_none(hint)
    if optional and (raw is None or (rules.loose and isinstance(raw, str) and raw.strip().lower() in NONE_WORDS)):
        return None
    if typing.get_origin(hint) is tuple:
        items = raw.replace(",", " ").split() if rules.loose and isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise rules.error(f"{rules.name(path)} must be a list of strings, got {_shown(raw)}")
        return tuple(items)
    if hint is float or (hint is int and rules.loose):
        return _number(raw, hint, path, rules)
    if hint is str and rules.loose and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return str(raw)
    if isinstance(hint, type) and isinstance(raw, hint) and not (hint is int and isinstance(raw, bool)):
        return _int64(raw, path, rules) if hint is int and isinstance(raw, int) else raw
    raise _refusal(raw, hint, path, rules)


def _int64(value: int, path: KeyPath, rules: Rules) -> int:
    """``value``, if it fits in 64 bits (YAML reads 0x and 0o numbers of any size, and json.dumps, which hashes
    the manifest, refuses an int of over 4300 digits)."""
    if not -INT_LIMIT <= value < INT_LIMIT:
        raise rules.error(f"{rules.name(path)} must be an integer of at most 64 bits, got {_shown(value)}")
    return value


def _number(raw: Any, hint: type, path: KeyPath, rules: Rules) -> Any:
    """A finite float, or (loose rules only) an int, from a number or text that spells one; never a bool."""
    number: Optional[float] = None
    if isinstance(raw, (int, float, str)) and not isinstance(raw, bool):
        try:
            number = float(raw)
        except ValueError:
            number = None
        except OverflowError:  # an int too large for a float: as good as infinite
            number = math.inf
    if number is None:
        raise _refusal(raw, hint, path, rules)
    if not math.isfinite(number):
        raise _refusal(raw, hint, path, rules, finite=True)
    if hint is float:
        return number
    if isinstance(raw, float):
        if not raw.is_integer():
            raise _refusal(raw, hint, path, rules)
        return _int64(int(raw), path, rules)
    try:
        value = int(raw)  # exact for ints and for text such as "12" (not through a float)
    except ValueError:  # text such as "2.5" or "1e3"
        raise _refusal(raw, hint, path, rules) from None
    return _int64(value, path, rules)


def _refusal(raw: Any, hint: Any, path: KeyPath, rules: Rules, finite: bool = False) -> Exception:
    """The error for a value of the wrong type: loose rules say what the text must spell, strict ones the type."""
    type_name = getattr(hint, "__name__", str(hint))
    if rules.loose:
        expected = "a string" if hint is str else f"a finite {type_name}" if hint in (int, float) else f"a {type_name}"
    else:
        expected = "a finite number" if finite else f"of type {type_name}"
    return rules.error(f"{rules.name(path)} must be {expected}, got {_shown(raw)}")


def _shown(raw: Any) -> str:
    """``repr(raw)``; Python refuses to write an int of over 4300 digits (ValueError), alone or in a list."""
    try:
        return repr(raw)
    except (ValueError, RecursionError):
        return f"a value too large to show ({type(raw).__name__})"


MAX_FILE_BYTES = 1 << 20  # a manifest or config file is a few KB; anything near this is not one


def read_small_file(path: str, what: str, fix: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``. Anything else (missing, a directory, a FIFO or device
    that would block or never end, too large, unreadable) raises ValueError with one line naming ``what`` and
    ``path``, ending in ``fix``; the caller re-raises it as its own error type."""
    import os
    import stat

    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist; {fix}") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror or e}; {fix}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, device or socket)"
        raise ValueError(f"{what} {path} is {kind}; {fix}")
    if info.st_size > max_bytes:
        raise ValueError(f"{what} {path} has {info.st_size:,} bytes, more than {max_bytes:,}; {fix}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror or e}; {fix}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{what} {path} grew past {max_bytes:,} bytes while read; {fix}")
    return data


def read_small_text(path: str, what: str, fix: str) -> str:
    """The UTF-8 text of a manifest or config file (``read_small_file``); ValueError otherwise."""
    data = read_small_file(path, what, fix)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.start}); {fix}") from None
