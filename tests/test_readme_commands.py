"""The README's commands exist: every chexlib subcommand and flag, every make target and setting.

The README and the book's reference pages (docs/*.md, split out of it) are read alike.
README.md's fenced shell blocks are read as a shell would split them
(continuation lines, comments, ``VAR=value`` prefixes, ``$B`` and
``"${ARGS[@]}"`` set earlier in the block, commands wrapped by
``horovodrun``); every ``chexlib SUBCMD ...`` (also ``.venv/bin/chexlib``,
``python -m chexlib.cli.main``) found there must parse with the parser
``chexlib.cli.main`` builds for that subcommand, each ``--flag`` spelled out in
full (argparse would accept an abbreviation). Every ``make TARGET VAR=value``
must name a Makefile target, each ``VAR`` must be read by the Makefile and its
value must reach the recipe ``make -n`` prints; the chexlib commands in that
recipe are checked too. Inline spans ``chexlib SUBCMD --flag ...`` and the
flag table of ``chexlib train`` are checked for their flags. Nothing is run
but ``make -n`` (a dry run) and argument parsing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from chexlib.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# the README and the reference pages split out of it (the book's, docs/*.md)
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
ASSIGN = re.compile(r"^[A-Za-z_]\w*=")
ARRAY = re.compile(r"^\s*([A-Za-z_]\w*)=\((.*)\)\s*$", re.S)
OPERATORS = {"|", "||", "&&", ";", "&"}
# A chexlib command named inside a shell comment ("# the whole study: ... .venv/bin/chexlib study
# ..."): a path to the program, or the bare name before a subcommand (not prose: "chexlib kernel").
SUBCOMMANDS = "|".join(map(re.escape, main.COMMANDS))
COMMENT_COMMAND = re.compile(rf"(?<![\w(/.-])(?:\S+/chexlib\s|chexlib\s+(?:{SUBCOMMANDS})\b)")


# --- reading shell text -------------------------------------------------------------------


def fenced_shell_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the block's first line, body) of each shell code block."""
    return [
        (text.count("\n", 0, m.start(2)) + 1, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1).lower() in SHELL_LANGS
    ]


def logical_lines(body: str, first_line: int = 1) -> list[tuple[int, str]]:
    """Join ``\\`` continuations and multi-line ``NAME=( ... )`` arrays into one line each."""
    out, buf, start = [], "", None
    for i, raw in enumerate(body.splitlines()):
        start = first_line + i if start is None else start
        buf += raw
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        if re.match(r"^\s*\w+=\(", buf) and buf.count("(") > buf.count(")"):
            buf += " "
            continue
        out.append((start, buf))
        buf, start = "", None
    if buf.strip():
        out.append((start, buf))
    return out


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment): the comment starts at a ``#`` that begins a word outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1 :]
    return line, ""


def _expand(tokens: list[str], variables: dict[str, list[str]]) -> list[str]:
    out = []
    for tok in tokens:
        m = re.fullmatch(r"\$\{?(\w+)(?:\[[@*]\])?\}?", tok)
        out.extend(variables[m.group(1)] if m and m.group(1) in variables else [tok])
    return out


def _simple_commands(tokens: list[str]) -> list[list[str]]:
    parts, cur = [], []
    for tok in tokens:
        if tok in OPERATORS:
            parts.append(cur)
            cur = []
        else:
            cur.append(tok)
    return [p for p in parts + [cur] if p]


def commands_in_line(code: str, variables: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """("chexlib" | "make", arguments) for each command chexlib owns in one line of shell.

    Assignments (``B="..."``, ``ARGS=(...)``) are recorded in ``variables`` for later lines.
    """
    array = ARRAY.match(code)
    if array:
        variables[array.group(1)] = shlex.split(array.group(2))
        return []
    try:
        tokens = shlex.split(code)
    except ValueError:  # unbalanced quotes: not a command we can read
        return []
    found = []
    for part in _simple_commands(tokens):
        n_env = next((i for i, t in enumerate(part) if not ASSIGN.match(t)), len(part))
        env, rest = part[:n_env], part[n_env:]
        if not rest:  # only assignments: remember them
            for tok in env:
                name, value = tok.split("=", 1)
                with contextlib.suppress(ValueError):
                    variables[name] = shlex.split(value)
            continue
        rest = _expand(rest, variables)
        if Path(rest[0]).name == "make":
            found.append(("make", rest[1:]))
            continue
        for j, tok in enumerate(rest):
            if Path(tok).name == "chexlib" and rest[j - 1 : j] not in (["-k"], ["--kernel"]):
                found.append(("chexlib", rest[j + 1 :]))
                break
            if re.fullmatch(r"python[\d.]*", Path(tok).name) and rest[j + 1 : j + 2] == ["-m"]:
                module = rest[j + 2] if len(rest) > j + 2 else ""
                if module.split(".")[0] == "chexlib":
                    # only chexlib.cli.main has a __main__ block that runs the CLI
                    args = (
                        rest[j + 3 :] if module == "chexlib.cli.main" else [f"<python -m {module}>"]
                    )
                    found.append(("chexlib", args))
                break
    return found


def shell_commands(body: str, first_line: int = 1) -> list[tuple[int, str, list[str]]]:
    """(line, kind, arguments) of every command chexlib owns in a block of shell."""
    variables: dict[str, list[str]] = {}
    out = []
    for line_no, line in logical_lines(body, first_line):
        code, comment = split_comment(line)
        for kind, args in commands_in_line(code, variables):
            out.append((line_no, kind, args))
        m = COMMENT_COMMAND.search(comment)
        if m:
            for kind, args in commands_in_line(comment[m.start() :], variables):
                out.append((line_no, kind, args))
    return out


def readme_commands(text: str) -> list[tuple[int, str, list[str]]]:
    return [cmd for start, body in fenced_shell_blocks(text) for cmd in shell_commands(body, start)]


# --- checking chexlib commands --------------------------------------------------------------


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """The subparser of ``name`` as ``chexlib.cli.main.main`` builds it (its module's arguments added)."""
    parser = main.build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if re.match(r"^--?[A-Za-z]", a)]


# Arguments naming a file of the repository (a study spec, a script) must name one that exists.
REPO_PATH = re.compile(r"^(?:papermill_runs|notebooks|tools|requirements)/[\w./-]+$")


def missing_repo_files(args: list[str]) -> list[str]:
    values = [a.split("=", 1)[-1] for a in args]
    return [
        f"no file {v} in the repository"
        for v in values
        if REPO_PATH.match(v) and not (ROOT / v).exists()
    ]


def check_chexlib(args: list[str]) -> list[str]:
    """What is wrong with ``chexlib ARGS`` (empty when the CLI accepts it as written)."""
    if not args:
        return ["no subcommand"]
    missing = missing_repo_files(args)
    if missing:
        return missing
    name = args[0]
    if name in ("-h", "--help"):
        return []
    if name not in main.COMMANDS:
        return [f"unknown subcommand {name!r} (chexlib has {', '.join(main.COMMANDS)})"]
    known = subcommand_parser(name)._option_string_actions
    problems = [f"chexlib {name}: no flag {flag}" for flag in _flags(args[1:]) if flag not in known]
    if problems:
        return problems
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            main.build_parser(name).parse_args(args)
    except SystemExit as exc:
        if exc.code:
            return [f"chexlib {name}: " + stderr.getvalue().strip().splitlines()[-1]]
    return []


def check_chexlib_flags(name: str, flags: list[str]) -> list[str]:
    """Flags written in prose (``--[no-]x`` meaning both): each must exist for ``name``."""
    if name not in main.COMMANDS:
        return [f"unknown subcommand {name!r}"]
    known = subcommand_parser(name)._option_string_actions
    return [f"chexlib {name}: no flag {f}" for f in flags if f not in known]


def prose_flags(text: str) -> list[str]:
    flags = []
    for neg, name in re.findall(r"--(\[no-\])?([A-Za-z][\w-]*)", text):
        flags.append(f"--{name}")
        if neg:
            flags.append(f"--no-{name}")
    return flags


# --- checking make commands -----------------------------------------------------------------


def make_targets(makefile: str) -> set[str]:
    targets = set()
    for m in re.finditer(r"^([A-Za-z0-9_.%/$() -]+?)\s*:(?![=:])", makefile, re.M):
        targets.update(t for t in m.group(1).split() if not t.startswith(("$", ".")))
    return targets


def check_make(args: list[str], root: Path = ROOT) -> list[str]:
    """What is wrong with ``make ARGS`` run in ``root`` (the repository)."""
    makefile = (root / "Makefile").read_text()
    settings = dict(a.split("=", 1) for a in args if ASSIGN.match(a))
    goals = [a for a in args if not ASSIGN.match(a) and not a.startswith("-")]
    problems = [
        f"make: no target {g!r} in the Makefile" for g in goals if g not in make_targets(makefile)
    ]
    problems += (
        [f"make: {p}" for p in missing_repo_files(list(settings.values()))] if root == ROOT else []
    )
    for var in settings:
        if not re.search(rf"\$[({{]{re.escape(var)}[)}}]", makefile):
            problems.append(f"make: {var}= is never read by the Makefile")
    if problems:
        return problems
    dry = subprocess.run(
        ["make", "-n", *args], cwd=root, capture_output=True, text=True, timeout=60
    )
    if dry.returncode:
        return [f"make -n {' '.join(args)}: {dry.stderr.strip()}"]
    for var, value in settings.items():
        if value not in dry.stdout and os.path.abspath(root / value) not in dry.stdout:
            problems.append(f"make: {var}={value} does not reach the recipe:\n{dry.stdout}")
    for _, kind, sub_args in shell_commands(dry.stdout):
        if kind == "chexlib":
            problems += [f"recipe of make {' '.join(args)}: {p}" for p in check_chexlib(sub_args)]
    return problems


# --- the README's commands ------------------------------------------------------------------

README_TEXT = "\n".join(page.read_text() for page in PAGES)
# (file:line, kind, args): each page parsed alone, so a block never runs into the next page
COMMANDS = [
    (f"{page.relative_to(ROOT)}:{line}", kind, args)
    for page in PAGES
    for line, kind, args in readme_commands(page.read_text())
]


def _id(cmd: tuple[int, str, list[str]]) -> str:
    line, kind, args = cmd
    return f"{line}-{kind}-" + "-".join(a for a in args[:1])


def test_readme_has_commands_to_check():
    """Guards the parser: the README's commands were found, not silently skipped."""
    kinds = [kind for _, kind, _ in COMMANDS]
    assert kinds.count("chexlib") >= 15, COMMANDS
    assert kinds.count("make") >= 3, COMMANDS
    subcommands = {args[0] for _, kind, args in COMMANDS if kind == "chexlib" and args}
    assert {"validate", "study", "train", "bench-pipeline", "data-service"} <= subcommands


@pytest.mark.parametrize("cmd", COMMANDS, ids=[_id(c) for c in COMMANDS])
def test_readme_command_is_accepted(cmd):
    line, kind, args = cmd
    problems = check_chexlib(args) if kind == "chexlib" else check_make(args)
    assert not problems, f"{line}: {kind} {shlex.join(args)}\n" + "\n".join(problems)


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def test_inline_chexlib_commands_use_real_flags():
    """Inline spans such as `chexlib convert DIR OUT [--variant png|compact]` name real flags."""
    problems, checked = [], 0
    for m in re.finditer(r"`([^`]+?)`", _prose(README_TEXT)):
        span = m.group(1)
        cmd = re.match(r"^(?:\S*/)?chexlib\s+([\w-]+)(.*)$", span, re.S)
        # also `bench-pipeline --disable STEP`: a subcommand's name before its flags
        cmd = cmd or re.match(rf"^({SUBCOMMANDS})(\s+--.*)$", span, re.S)
        if "\n\n" in span or not cmd:
            continue
        checked += 1
        problems += check_chexlib_flags(cmd.group(1), prose_flags(cmd.group(2)))
    assert checked >= 10, f"only {checked} inline chexlib commands found"
    assert not problems, "\n".join(problems)


def test_train_flag_table_lists_real_flags():
    """The `| flag | meaning |` table under `chexlib train` lists flags that exist."""
    prose = _prose(README_TEXT)
    header = re.search(r"^\| flag \|.*$", prose, re.M)
    assert header, (
        "README.md and docs/*.md: the flag table of chexlib train (`| flag | meaning ...`) not found"
    )
    before = re.findall(r"`chexlib ([\w-]+)", prose[: header.start()])
    assert before and before[-1] == "train", "the flag table no longer follows `chexlib train`"
    rows = re.findall(r"^\|([^|\n]*(?:\\\|[^|\n]*)*)\|", prose[header.end() :], re.M)
    table = []
    for row in rows[1:]:  # rows[0] is the | --- | line
        if not row.strip():
            break
        table.append(row)
    flags = [f for row in table for f in prose_flags(row)]
    assert len(flags) >= 20, flags
    problems = check_chexlib_flags("train", flags)
    assert not problems, "\n".join(problems)


# --- the checker can fail -------------------------------------------------------------------


def test_checker_reports_a_made_up_flag():
    assert check_chexlib(["validate", "outputs/x"]) == []
    assert check_chexlib(["train", "--data", "d", "--frobnicate", "3"]) == [
        "chexlib train: no flag --frobnicate"
    ]
    # argparse would take `--pipe` for --pipeline; the README must spell flags out.
    assert check_chexlib(["train", "--pipe", "naive"]) == ["chexlib train: no flag --pipe"]
    assert "invalid choice" in check_chexlib(["train", "--model", "vgg16"])[0]
    assert "unknown subcommand 'fit'" in check_chexlib(["fit", "--epochs", "2"])[0]
    assert check_chexlib(["<python -m chexlib>"])  # there is no chexlib/__main__.py
    assert check_chexlib(["study", "papermill_runs/nosuch.yaml"]) == [
        "no file papermill_runs/nosuch.yaml in the repository"
    ]
    assert check_chexlib_flags("train", prose_flags("--[no-]evaluate --evalu8")) == [
        "chexlib train: no flag --evalu8"
    ]


def test_checker_reports_a_missing_make_target_or_setting(tmp_path):
    assert check_make(["nosuchtarget"]) == ["make: no target 'nosuchtarget' in the Makefile"]
    assert check_make(["study", "DATASET=/data"]) == [
        "make: DATASET= is never read by the Makefile"
    ]
    # A setting the Makefile mentions but never passes on to the recipe (the bug of issue 14).
    (tmp_path / "Makefile").write_text(
        "SPEC ?= demo.yaml\nstudy:\n\t$(if $(DATA),,true) chexlib study $(SPEC)\n"
    )
    assert check_make(["study", "SPEC=a.yaml"], tmp_path) == []
    (problem,) = check_make(["study", "SPEC=a.yaml", "DATA=/nih"], tmp_path)
    assert problem.startswith("make: DATA=/nih does not reach the recipe")


def test_shell_reading():
    block = (
        'B=".venv/bin/chexlib bench-pipeline"\n'
        "$B --pipeline naive --data d   # ablation\n"
        "CHEXLIB_DATA=/x .venv/bin/horovodrun --gloo -np 2 .venv/bin/chexlib train \\\n"
        "    --epochs 2\n"
        "ARGS=(train --source records\n"
        '      --epochs 20 --out "outputs/slurm-$SLURM_JOB_ID")\n'
        '# the same: srun .venv/bin/chexlib "${ARGS[@]}"\n'
        "make study SPEC=a.yaml DATA=/d && X=1 make lab  # chexlib kernel (not a command)\n"
        "python -m chexlib.cli.main validate d\n"
    )
    assert shell_commands(block) == [
        (2, "chexlib", ["bench-pipeline", "--pipeline", "naive", "--data", "d"]),
        (3, "chexlib", ["train", "--epochs", "2"]),
        (
            7,
            "chexlib",
            [
                "train",
                "--source",
                "records",
                "--epochs",
                "20",
                "--out",
                "outputs/slurm-$SLURM_JOB_ID",
            ],
        ),
        (8, "make", ["study", "SPEC=a.yaml", "DATA=/d"]),
        (8, "make", ["lab"]),
        (9, "chexlib", ["validate", "d"]),
    ]
