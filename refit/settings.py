"""Run settings that are also command-line flags.

A run's configuration is a dataclass; a field declared with :func:`setting` is
a flag of the command that builds that configuration (``refit pretrain`` for
every model family's config, ``refit finetune`` for
:class:`refit.posttrain.config.FinetuneConfig`). The field carries its help, its
argument type and its group, so the command line never lists a setting of
its own: :func:`add_arguments` makes the flags from the dataclasses and
:func:`config_from_args` builds the configuration back from the parsed flags.

Flags default to "not given" (argparse's ``SUPPRESS``): the configuration's
own default applies, so several configurations with different defaults share
one flag, and its help lists each default.

The argument types of the flags (:func:`positive_int`, :func:`finite_float`,
...) live here too; each raises :class:`argparse.ArgumentTypeError`, which
argparse reports with the flag's name.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

# --- argument types ---------------------------------------------------------------------------------


def int_list(text: str) -> List[int]:
    """'200,600', '[200, 600]' or '200' -> [200, 600] (positive integers)."""
    try:
        value = ast.literal_eval(text.strip()) if text.strip().startswith("[") else [
            int(p) for p in text.replace(" ", "").split(",") if p]
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if isinstance(value, int):
        value = [value]
    if not value or not all(isinstance(v, int) and v > 0 for v in value):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return list(value)


def float_list(text: str) -> List[float]:
    """'0.2,0.5' -> [0.2, 0.5] (positive numbers)."""
    try:
        value = [float(p) for p in text.replace(" ", "").strip("[]").split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not value or not all(v > 0 for v in value):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return value


def int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argument type: an integer >= ``minimum``; ``what`` names it in the error ("a positive integer")."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


positive_int = int_at_least(1, "a positive integer")
nonnegative_int = int_at_least(0, "an integer >= 0")


def finite_float(text: str, alternative: str = "") -> float:
    """A finite number; ``alternative`` (e.g. " or 'none'") names what else the flag takes, for the error."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number{alternative}, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number{alternative}, got {text!r}")
    return v


def positive_float(text: str) -> float:
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


#: Seeds go to torch.manual_seed and numpy's RandomState, which take 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1


def seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {SEED_MAX}], got {v}")
    return v


def weight_grid(text: str) -> Optional[Tuple[float, ...]]:
    """Comma-separated numbers >= 0, or "none" (None)."""
    if text.strip().lower() == "none":
        return None
    values = []
    for part in text.split(","):
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers or 'none', got {text!r}") from None
        if not math.isfinite(v) or v < 0:
            raise argparse.ArgumentTypeError(f"expected guidance weights >= 0, got {part.strip()!r}")
        values.append(v)
    return tuple(values)


# --- settings as flags --------------------------------------------------------------------------------

_KEY = "refit.flag"


def setting(default: Any = dataclasses.MISSING, help: str = "", *, type: Optional[Callable] = None,
            choices: Optional[Sequence[Any]] = None, group: Optional[str] = None, metavar: Optional[str] = None,
            flag: Optional[str] = None, default_text: Optional[str] = None, switch: bool = False,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is also a command-line flag.

    ``help`` explains it (the default is appended, or ``default_text`` instead); ``type`` parses the
    text (default: from the default's type, ``int``, :func:`finite_float` or ``str``; ``bool`` gives a
    ``--x / --no-x`` pair); ``choices`` limit it; ``group`` is its section of ``--help``; ``flag`` its
    name (default: ``--`` and the field's name with dashes); ``switch``: a bare ``--x`` that sets True.
    """
    meta = {_KEY: {"help": help, "type": type, "choices": None if choices is None else list(choices),
                   "group": group, "metavar": metavar, "flag": flag, "default_text": default_text,
                   "switch": switch}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_fields(cls: type) -> Dict[str, Dict[str, Any]]:
    """``{field name: its flag description}`` of a config dataclass, in field order.

    A subclass that only changes a field's default keeps the flag its parent declared.
    """
    found = {}
    for f in dataclasses.fields(cls):
        for klass in cls.__mro__:
            own = getattr(klass, "__dataclass_fields__", {}).get(f.name)
            if own is not None and _KEY in own.metadata:
                found[f.name] = own.metadata[_KEY]
                break
    return found


def flag_name(name: str, meta: Mapping[str, Any]) -> str:
    return meta.get("flag") or "--" + name.replace("_", "-")


def _default(cls: type, name: str) -> Any:
    f = cls.__dataclass_fields__[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser,
                  configs: Sequence[Tuple[str, type]]) -> Dict[str, Tuple[str, List[str]]]:
    """Adds one flag per :func:`setting` field of the ``(label, config class)`` pairs; returns
    ``{field name: (its flag, the labels whose config has it)}``.

    A field that several configs declare is one flag. Its help gives each default, with the labels
    that have it when they differ or when only some configs take the flag.
    """
    owners: Dict[str, List[Tuple[str, type]]] = {}
    metas: Dict[str, Dict[str, Any]] = {}
    for label, cls in configs:
        for name, meta in flag_fields(cls).items():
            owners.setdefault(name, []).append((label, cls))
            metas.setdefault(name, meta)
    groups: Dict[str, Any] = {}
    labels = [label for label, _ in configs]
    for name, meta in metas.items():
        has = owners[name]
        if meta["default_text"] is not None:
            shown = meta["default_text"]
        else:
            values: Dict[str, List[str]] = {}
            for label, cls in has:
                values.setdefault(_shown(_default(cls, name)), []).append(label)
            every = len(has) == len(labels)
            shown = ", ".join(v if every and len(values) == 1 else f"{v} ({', '.join(ls)})"
                              for v, ls in values.items())
        text = meta["help"]
        text = (f"{text}; default: {shown}" if text else f"default: {shown}").replace("%", "%%")
        kwargs: Dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text}
        default = _default(has[0][1], name)
        kind = meta["type"]
        if meta["switch"]:
            kwargs["action"] = "store_true"
        elif kind is bool or (kind is None and isinstance(default, bool)):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if kind is None and meta["choices"] is None:
                kind = int if isinstance(default, int) else finite_float if isinstance(default, float) else None
            if kind is not None:
                kwargs["type"] = kind
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
            if meta["metavar"] is not None:
                kwargs["metavar"] = meta["metavar"]
        title = meta["group"]
        if title is None:
            target = parser
        else:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        target.add_argument(flag_name(name, meta), **kwargs)
    return {name: (flag_name(name, metas[name]), [label for label, _ in has]) for name, has in owners.items()}


def given_settings(args: argparse.Namespace, cls: type) -> Dict[str, Any]:
    """The flags of ``cls``'s fields that were given, as its keyword arguments (lists become tuples)."""
    given = {name: getattr(args, name) for name in flag_fields(cls) if hasattr(args, name)}
    return {name: tuple(v) if isinstance(v, list) else v for name, v in given.items()}


def foreign_settings(args: argparse.Namespace, cls: type, owners: Mapping[str, Tuple[str, Sequence[str]]],
                     what: str) -> List[str]:
    """A line for each flag given that ``cls`` has no field for, naming the configs that take it
    (``owners``: what :func:`add_arguments` returned; ``what``: how the line names ``cls``)."""
    own = flag_fields(cls)
    return [f"{flag} is not a setting of {what} (it is one of {', '.join(labels)})"
            for name, (flag, labels) in owners.items() if name not in own and hasattr(args, name)]


__all__ = ["setting", "flag_fields", "flag_name", "add_arguments", "given_settings", "foreign_settings",
           "int_list", "float_list", "int_at_least", "positive_int", "nonnegative_int", "finite_float",
           "positive_float", "seed", "weight_grid", "SEED_MAX"]
