"""chexlib.core.flags: a config dataclass's fields as command-line flags, and back."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from chexlib.core.flags import add_flags, config_from_args, config_to_argv, flags_of, option

STEPS = ("cache", "prefetch", "parallel-map")


@dataclass(frozen=True)
class Example:
    """Every kind of field the builder turns into a flag."""

    run: str = option("run folder", default="", positional=True)
    name: str = option("a name", default="plain")
    count: int = option("how many", default=3)
    rate: float = option("how fast", default=0.5)
    limit: float | None = option("an optional cap", default=None)
    workers: int | None = option("optional workers", default=None)
    mode: str = option("one of three", default="b", choices=("a", "b", "c"))
    lazy: str = option("choices from a callable", default="x", choices=lambda: ("x", "y"))
    data_dir: str | None = option("renamed flag", default=None, flag="--data")
    verbose: bool = option("a switch that turns on", default=False)
    single_core: bool = option("a switch that turns off", default=True)
    processes: bool = option("renamed off switch", default=True, flag="--threads")
    disable: tuple[str, ...] = option("repeatable", default=(), choices=STEPS)
    hidden: int = option("not a flag", default=7, cli=False)
    plain: int = dataclasses.field(default=1)  # no metadata: still a flag


def parser_for(cls=Example, **kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_flags(parser, cls, **kwargs)
    return parser


def parse(*argv: str, cls=Example, **kwargs) -> argparse.Namespace:
    return parser_for(cls, **kwargs).parse_args(["RUN", *argv] if cls is Example else list(argv))


def test_defaults_come_from_the_dataclass():
    args = parse()
    config = config_from_args(Example, args)
    assert config == Example(run="RUN")
    assert args.disable == [] and config.disable == ()  # a fresh list, a tuple in the config
    assert not hasattr(args, "hidden")


def test_types_follow_the_annotations():
    args = parse("--name", "n", "--count", "5", "--rate", "0.25", "--plain", "2")
    assert (args.name, args.count, args.rate, args.plain) == ("n", 5, 0.25, 2)
    with pytest.raises(SystemExit):
        parse("--count", "many")


def test_optional_types_take_a_value_and_default_to_none():
    assert parse().limit is None and parse().workers is None
    args = parse("--limit", "2.5", "--workers", "4")
    assert args.limit == 2.5 and isinstance(args.limit, float) and args.workers == 4
    with pytest.raises(SystemExit):
        parse("--limit", "fast")


def test_bool_fields_are_switches_away_from_their_default():
    args = parse("--verbose", "--no-single-core", "--threads")
    assert (args.verbose, args.single_core, args.processes) == (True, False, False)
    for missing in ("--no-verbose", "--single-core", "--processes", "--no-processes"):
        with pytest.raises(SystemExit):
            parse(missing)


def test_negatable_bools_get_both_flags():
    args = parse("--no-verbose", "--single-core", cls=Example, negatable=True)
    assert args.verbose is False and args.single_core is True
    assert parse("--verbose", negatable=True).verbose is True


def test_tuple_fields_are_repeatable_with_choices():
    args = parse("--disable", "cache", "--disable", "prefetch")
    assert config_from_args(Example, args).disable == ("cache", "prefetch")
    with pytest.raises(SystemExit):
        parse("--disable", "magic")


def test_choices_plain_and_from_a_callable():
    assert parse("--mode", "c", "--lazy", "y").mode == "c"
    for bad in (("--mode", "d"), ("--lazy", "z")):
        with pytest.raises(SystemExit):
            parse(*bad)


def test_a_renamed_flag_keeps_the_field_as_dest():
    assert parse("--data", "/d").data_dir == "/d"
    with pytest.raises(SystemExit):
        parse("--data-dir", "/d")


def test_help_and_its_default():
    text = parser_for().format_help()
    assert "how many (default: 3)" in text and "run folder" in text
    assert "(default: 'plain')" in text  # repr: an empty string shows as ''
    assert "how many\n" in parser_for(default_help="").format_help()
    assert "an optional cap\n" in text  # None is "not given": no "(default: None)"


def test_hidden_fields_keep_their_default_or_an_override():
    assert config_from_args(Example, parse()).hidden == 7
    assert config_from_args(Example, parse(), hidden=9).hidden == 9
    assert "hidden" not in [f.field.name for f in flags_of(Example)]


@dataclass(frozen=True)
class Required:
    out: str = option("no default: a required flag")
    scale: float | None = option("a float or None", default=None)


def test_a_field_without_default_is_required_and_float_or_none_works():
    with pytest.raises(SystemExit):
        parse(cls=Required)
    assert config_from_args(Required, parse("--out", "o", cls=Required)) == Required(out="o")
    args = parse("--out", "o", "--scale", "1e-3", cls=Required)
    assert config_from_args(Required, args).scale == 0.001


def test_unsupported_types_are_refused():
    @dataclass
    class Bad:
        table: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="table"):
        parser_for(Bad)


@pytest.mark.parametrize("negatable", [False, True])
def test_config_to_argv_round_trips(negatable):
    config = Example(
        run="r",
        count=4,
        limit=1.5,
        mode="a",
        data_dir="/d",
        verbose=True,
        single_core=False,
        processes=False,
        disable=("cache", "prefetch"),
    )
    argv = config_to_argv(config, negatable=negatable)
    assert argv[0] == "r" and "--name" not in argv  # positional first, defaults left out
    args = parser_for(negatable=negatable).parse_args(argv)
    assert config_from_args(Example, args) == config


def test_config_to_argv_refuses_none_where_the_default_is_not():
    with pytest.raises(ValueError, match="name=None"):
        config_to_argv(Example(name=None))


@dataclass(frozen=True)
class Grouped:
    """One flag with several values, a three-state switch, a metavar, an exclusive pair."""

    workers: tuple[int, ...] = option("worker counts", default=(1, 2), nargs="+")
    only: tuple[str, ...] | None = option("a stage (repeatable)", default=None, metavar="STAGE")
    log: bool | None = option("stream the output (None: as the spec says)", default=None)
    per_shard: int = option("records per shard", default=256, exclusive="how")
    shards: int | None = option("shards instead", default=None, exclusive="how")


def test_nargs_plus_takes_all_values_after_one_flag():
    assert config_from_args(Grouped, parse(cls=Grouped)).workers == (1, 2)
    assert config_from_args(Grouped, parse("--workers", "1", "2", "4", cls=Grouped)).workers == (
        1,
        2,
        4,
    )
    with pytest.raises(SystemExit):
        parse("--workers", cls=Grouped)


def test_optional_bool_has_three_states_and_metavar_shows():
    assert config_from_args(Grouped, parse(cls=Grouped)).log is None
    assert config_from_args(Grouped, parse("--log", cls=Grouped)).log is True
    assert config_from_args(Grouped, parse("--no-log", cls=Grouped)).log is False
    only = config_from_args(Grouped, parse("--only", "a", "--only", "b", cls=Grouped)).only
    assert only == ("a", "b")
    assert "--only STAGE" in parser_for(Grouped).format_help()


def test_exclusive_fields_refuse_each_other():
    assert config_from_args(Grouped, parse("--shards", "3", cls=Grouped)).shards == 3
    with pytest.raises(SystemExit):
        parse("--per-shard", "9", "--shards", "3", cls=Grouped)


def test_config_to_argv_round_trips_the_new_kinds():
    config = Grouped(workers=(4, 8), only=("x",), log=False, shards=2)
    argv = config_to_argv(config)
    assert argv[argv.index("--workers") + 1 : argv.index("--workers") + 3] == ["4", "8"]
    assert config_from_args(Grouped, parser_for(Grouped).parse_args(argv)) == config
