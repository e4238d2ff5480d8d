"""Command-line flags built from a config dataclass: one way for every subcommand.

Each field of a config dataclass is one flag:

* its name is the field's with ``_`` -> ``-`` (``batch_size``: ``--batch-size``);
  metadata ``flag`` renames it (``flag="--data"`` for ``data_dir``) and the
  parsed value still lands in ``args.<field name>``;
* its type comes from the annotation: ``str``, ``int``, ``float``; ``X | None``
  is an ``X`` flag whose default is None; ``tuple[X, ...]`` is a repeatable
  flag (``--disable a --disable b``), or one flag taking several values
  (``--workers 1 2``) with metadata ``nargs="+"``; ``bool`` is a switch that
  flips the default (``--name`` stores True when the default is False,
  ``--no-name`` stores False when it is True), or ``--name/--no-name`` with
  ``negatable``; ``bool | None`` is always ``--name/--no-name`` (None: not given);
* its default is the dataclass's, never repeated by hand (a field without a
  default is a required flag);
* its help and choices are the field's metadata, written with :func:`option`;
  ``choices`` may be a callable, called when the parser is built (for choices
  that live in a module the config should not import);
* metadata ``cli=False`` keeps a field off the command line,
  ``positional=True`` makes it a positional argument, ``metavar`` names its
  value in the help, and fields with the same ``exclusive`` name form a
  mutually exclusive group (at most one of them on a command line).

:func:`add_flags` adds the flags to a parser, :func:`config_from_args` builds
the config back from the parsed arguments, and :func:`config_to_argv` writes
the flags that reproduce a config (for a command run elsewhere, e.g. under
horovodrun).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

DEFAULT_HELP = " (default: {default!r})"  # appended to each valued flag's help


def option(
    help_text: str,
    *,
    choices=None,
    flag: str | None = None,
    positional: bool = False,
    negatable: bool | None = None,
    cli: bool = True,
    nargs: str | None = None,
    metavar: str | None = None,
    exclusive: str | None = None,
    **field_kwargs,
):
    """A dataclass field that carries its flag's help (and choices, name, kind) as metadata.

    Args:
        help_text: the flag's help.
        choices: the values allowed (each one, for a repeatable flag), or a
            callable returning them when the parser is built.
        flag: the flag's name when it is not ``--`` + the field name.
        positional: a positional argument instead of a flag.
        negatable: a bool field gets ``--name/--no-name`` (None: as
            :func:`add_flags` is told).
        cli: False keeps the field off the command line.
        nargs: ``"+"``: a tuple field is one flag with one or more values, not
            a repeatable flag.
        metavar: the value's name in the help.
        exclusive: the name of a mutually exclusive group this flag belongs to.
        **field_kwargs: ``default`` or ``default_factory``, as ``dataclasses.field``.
    """
    metadata = {"help": help_text, "choices": choices, "flag": flag, "positional": positional}
    metadata.update(negatable=negatable, cli=cli, nargs=nargs, metavar=metavar)
    metadata.update(exclusive=exclusive)
    return dataclasses.field(metadata=metadata, **field_kwargs)


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one dataclass field appears on the command line."""

    field: dataclasses.Field
    kind: type  # str, int, float or bool: of each value
    repeated: bool  # tuple[X, ...]: several values (one per use, or all after one flag)
    optional: bool = False  # ``X | None``

    @property
    def name(self) -> str:
        """The option string (``--batch-size``), or the field name of a positional."""
        if self.field.metadata.get("positional"):
            return self.field.name
        return self.field.metadata.get("flag") or "--" + self.field.name.replace("_", "-")

    @property
    def switch(self) -> str:
        """A bool field's one switch: :attr:`name`, or ``--no-<name>`` when its default is
        True and the flag is not renamed."""
        if self.field.metadata.get("flag") or not self.default:
            return self.name
        return "--no-" + self.name.removeprefix("--")

    @property
    def default(self):
        """The dataclass default (:data:`dataclasses.MISSING` when there is none)."""
        f = self.field
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return f.default

    @property
    def many(self) -> bool:
        """One flag followed by all its values (``nargs="+"``), not one use per value."""
        return self.repeated and self.field.metadata.get("nargs") == "+"

    def negatable(self, fallback: bool) -> bool:
        if self.kind is bool and self.optional:  # three states need both flags
            return True
        value = self.field.metadata.get("negatable")
        return fallback if value is None else value


def flags_of(config_cls) -> list[Flag]:
    """The :class:`Flag` of every command-line field of ``config_cls``, in field order."""
    hints = typing.get_type_hints(config_cls)
    return [
        Flag(f, *_kind(hints[f.name], f.name))
        for f in dataclasses.fields(config_cls)
        if f.metadata.get("cli", True)
    ]


def _kind(annotation, name: str) -> tuple[type, bool, bool]:
    """(type of each value, repeated, optional) of a field annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            kind, repeated, _ = _kind(rest[0], name)
            return kind, repeated, True
    elif origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (str, int, float):
            return args[0], True, False
    elif annotation in (str, int, float, bool):
        return annotation, False, False
    raise TypeError(f"field {name!r}: no command-line flag for type {annotation!r}")


def add_flags(
    parser: argparse.ArgumentParser,
    config_cls,
    *,
    default_help: str = DEFAULT_HELP,
    negatable: bool = False,
) -> None:
    """Add one flag per command-line field of the dataclass ``config_cls`` to ``parser``.

    Args:
        default_help: appended to the help of each flag that takes a value and
            has a default other than None, formatted with ``default=`` the
            dataclass default ("": nothing).
        negatable: every bool field gets ``--name/--no-name`` (argparse's
            ``BooleanOptionalAction``) rather than one switch.
    """
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for flag in flags_of(config_cls):
        exclusive = flag.field.metadata.get("exclusive")
        if exclusive and exclusive not in groups:
            groups[exclusive] = parser.add_mutually_exclusive_group()
        _add_flag(groups.get(exclusive, parser), flag, default_help, negatable)


def _add_flag(parser, flag: Flag, default_help: str, negatable: bool) -> None:
    meta, default = flag.field.metadata, flag.default
    help_text = meta.get("help")
    choices = meta.get("choices")
    choices = tuple(choices() if callable(choices) else choices) if choices else None
    if meta.get("positional"):
        parser.add_argument(flag.name, type=flag.kind, choices=choices, help=help_text)
        return
    kwargs: dict = {"dest": flag.field.name, "help": help_text}
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    if flag.kind is bool:
        if default is dataclasses.MISSING:
            raise TypeError(f"field {flag.field.name!r}: a bool flag needs a default")
        if flag.negatable(negatable):  # argparse adds "(default: ...)" to the help itself
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag.name, action=action, default=default, **kwargs)
        else:
            action = "store_false" if default else "store_true"
            parser.add_argument(flag.switch, action=action, default=default, **kwargs)
        return
    if default is not dataclasses.MISSING:
        kwargs["default"] = list(default) if flag.repeated and default is not None else default
        # None means "not given": the help says what happens then, "(default: None)" would not
        if help_text is not None and default_help and default is not None:
            kwargs["help"] = help_text + default_help.format(default=default)
    if flag.many:
        kwargs["nargs"] = "+"
    elif flag.repeated:
        kwargs["action"] = "append"
    parser.add_argument(flag.name, type=flag.kind, choices=choices, **kwargs)


def config_from_args(config_cls, args: argparse.Namespace, **overrides):
    """``config_cls`` from parsed arguments: its command-line fields, then ``overrides``.

    Fields off the command line keep their dataclass defaults unless overridden;
    repeated flags become tuples.
    """
    values = {}
    for flag in flags_of(config_cls):
        value = getattr(args, flag.field.name)
        values[flag.field.name] = tuple(value) if flag.repeated and value is not None else value
    return config_cls(**{**values, **overrides})


def config_to_argv(config, *, negatable: bool = False) -> list[str]:
    """The arguments that reproduce ``config`` through :func:`add_flags` (non-defaults only).

    Positional arguments come first. ``negatable`` must be what the parser was
    built with.

    Raises:
        ValueError: a value no flag can give (None where the default is not None).
    """
    positional, argv = [], []
    for flag in flags_of(type(config)):
        value = getattr(config, flag.field.name)
        if flag.field.metadata.get("positional"):
            positional.append(str(value))
        elif value == flag.default:
            continue
        elif flag.kind is bool:
            no = not value and flag.negatable(negatable)
            argv.append("--no-" + flag.name.removeprefix("--") if no else flag.switch)
        elif value is None:
            raise ValueError(f"{flag.field.name}=None cannot be given on the command line")
        elif flag.many:
            argv += [flag.name, *map(str, value)]
        else:
            for item in value if flag.repeated else (value,):
                argv += [flag.name, str(item)]
    return positional + argv
