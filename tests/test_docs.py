"""The documentation against what runs: each documented flag, default and choice against the parsers, the class
store's worked example run as its page shows it, and the README's figures on the pages it links to."""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
from typing import Any

import pytest
from conftest import REPO_ROOT, SHARED_DATA

from simsearch import cli

DOCS = REPO_ROOT / "docs"
PROGRESS = re.compile(r"\d+%\|")  # a progress bar (tqdm): its lines are left out of a transcript


# --- flags ---------------------------------------------------------------------------------------------------------


def script_defaults() -> dict[str, Any]:
    """The defaults the research script hands its parser: its upper-case constants, read from its source."""
    import ast

    tree = ast.parse((REPO_ROOT / "p1_similarity_search_rsch.py").read_text(encoding="utf-8"))
    constants = {target.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 for target in node.targets if isinstance(target, ast.Name) and target.id.isupper()}
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "attr", "") == "parse_script_args")
    defaults_call = next(keyword.value for keyword in call.keywords if keyword.arg == "defaults")
    return {keyword.arg: constants[keyword.value.id] for keyword in defaults_call.keywords}


def script_parser_actions() -> dict[str, argparse.Action]:
    """The research script's options by flag, with the script's own constants as defaults (what ``--help`` shows)."""
    parser = cli.script_parser(defaults=script_defaults())
    return {flag: action for action in parser._actions for flag in action.option_strings}


def documented_flags(page: str) -> list[tuple[str, str, str]]:
    """``(flags, default, row)`` of each row of a page's flag tables: the first cell's flags, the second cell."""
    rows = []
    for line in (DOCS / page).read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) >= 3 and cells[0].startswith("`--"):
            rows.append((cells[0], cells[1], line))
    return rows


def test_every_flag_of_the_script_page_is_the_parsers_with_its_choices_and_default():
    actions = script_parser_actions()
    rows = documented_flags("script.md")
    assert len(rows) >= 15
    documented = set()
    for flags, default, line in rows:
        for usage in re.findall(r"`(--[a-z][a-z-]*)([^`]*)`", flags):
            flag, rest = usage
            assert flag in actions, f"docs/script.md documents {flag}, which the script does not take: {line}"
            documented.add(flag)
            action = actions[flag]
            choices = re.fullmatch(r" \[?([a-z0-9_]+(?:\\\|[a-z0-9_]+)+)\]?", rest)
            if choices and action.choices is not None:
                assert choices.group(1).split("\\|") == list(action.choices), line
            shown = re.match(r"`([^`]*)`", default)
            if shown and len(re.findall(r"`(--[a-z][a-z-]*)", flags)) == 1 and action.default not in (None, False):
                assert shown.group(1) == str(action.default), f"{flag}: documented {shown.group(1)}, --help says " \
                                                                 f"{action.default}"
    undocumented = sorted(flag for flag in actions if flag.startswith("--") and flag not in documented
                          and flag not in ("--help", "--no-reproducible", "--no-compile", "--no-tune-allocator"))
    assert undocumented == [], f"flags of --help missing from docs/script.md: {undocumented}"


# --- every documented command ---------------------------------------------------------------------------------------


COMMAND_STARTS = ("python p1_similarity_search_rsch.py", "python -m simsearch", "python -m benchmarks.",
                  "similarity-search", "similarity-classdb", "similarity-grid", "similarity-distributed")


def documented_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for every command of the package shown in a code block of the README or ``docs/``:
    continuation lines joined, a shown prompt (``$``) and anything after a pipe or redirection left out."""
    commands = []
    for page in [REPO_ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
        prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
        lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
        for line in lines + re.findall(r"`([^`]+)`", prose):
            line = line.strip().removeprefix("$ ")
            if line.startswith(COMMAND_STARTS):
                commands.append((page.name, re.split(r" (?:\||2>|>|&&|;)", line)[0]))
    return commands


def parser_of(words: list[str]) -> tuple[argparse.ArgumentParser | None, list[str]]:
    """The parser that a documented command's words go to, and the words it parses."""
    import importlib

    if words[0] == "python" and words[1] == "-m":
        words = words[2:]
    families = {"store": cli.class_store_parser, "grid": cli.grid_parser, "distributed": cli.distributed_parser}
    console = {"similarity-classdb": "store", "similarity-grid": "grid", "similarity-distributed": "distributed"}
    if words[0] in console:
        return families[console[words[0]]](), words[1:]
    if words[0] == "simsearch" and words[1:2] and words[1] in families:
        return families[words[1]](), words[2:]
    if words[0].startswith("benchmarks."):
        module = importlib.import_module(words[0])
        parsed = {}

        def capture(parser: argparse.ArgumentParser, _argv: Any = None) -> None:
            parsed["parser"] = parser
            raise SystemExit(0)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(argparse.ArgumentParser, "parse_args", capture)
            with pytest.raises(SystemExit):
                module.parse_args([])
        return parsed["parser"], words[1:]
    script_words = words[2:] if words[0] in ("simsearch", "python") else words[1:]  # -m simsearch run, the file
    return cli.script_parser(defaults=script_defaults()), script_words


def test_every_documented_command_of_the_package_parses():
    """Every command the README and docs/ show takes only options its parser knows, with values it admits."""
    import shlex

    commands = documented_commands()
    assert len(commands) >= 40
    refused = []
    for page, command in commands:
        shown = re.sub(r"\[(--[^\]]+)\]", r"\1", command.replace("$MODEL", "--model M"))  # [--weights W]: given
        parser, arguments = parser_of(shlex.split(shown))
        if not arguments and not shown.startswith("python p1_"):
            continue  # the command named in prose, without its options
        try:
            parser.parse_args(arguments)
        except SystemExit as error:
            if error.code not in (0, None):
                refused.append(f"{page}: {command}")
    assert refused == []


# --- the class store's worked example --------------------------------------------------------------------------------


def worked_example(page: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """A page's worked example: its setup (the first ``bash`` block after the heading) and each ``$ command`` of
    the ``text`` blocks with the lines the page shows it printing."""
    text = (DOCS / page).read_text(encoding="utf-8").split("## Worked example", 1)[1]
    blocks = re.findall(r"```(bash|text)\n(.*?)```", text, re.S)
    setup = next(body for kind, body in blocks if kind == "bash")
    steps: list[tuple[str, list[str]]] = []
    for kind, body in blocks:
        for line in body.splitlines() if kind == "text" else ():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps and line:
                steps[-1][1].append(line)
    return setup, steps


def comparable(line: str) -> str:
    """A printed line with long decimals rounded to four places: float32 work may move the last digits."""
    return re.sub(r"\d+\.\d{5,}", lambda number: f"{float(number.group(0)):.4f}", line)


def run_worked_example(page: str, folder: pathlib.Path, **env: str) -> list[tuple[str, list[str], list[str]]]:
    """Each ``$ command`` of a page's worked example, run in ``folder`` after its setup, with the lines the page
    shows and the lines it printed (stdout and stderr; progress bars left out)."""
    setup, steps = worked_example(page)
    (folder / "tests").symlink_to(REPO_ROOT / "tests")  # the class store's setup imports the suite's image maker
    marker = "=== next step ==="
    script = setup + "".join(f"echo '{marker}'\n( {command} ) 2>&1\n" for command, _ in steps)
    completed = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=900, cwd=folder,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", **env},
    )
    outputs = completed.stdout.split(marker + "\n")[1:]
    assert len(outputs) == len(steps), completed.stderr[-2000:]
    return [(command, shown, [line for line in printed.split("\n")  # progress bars redraw with carriage returns
                              if line.strip() and "\r" not in line and not PROGRESS.search(line)])
            for (command, shown), printed in zip(steps, outputs)]


def test_the_class_store_worked_example_prints_what_its_page_shows(tmp_path, lite0_weights):
    steps = run_worked_example("class-store.md", tmp_path)
    assert len(steps) >= 9
    for command, shown, printed in steps:
        assert [comparable(line) for line in printed] == [comparable(line) for line in shown], f"$ {command}"


def test_the_sentence_worked_example_prints_what_its_page_shows(tmp_path, minilm_folder):
    trec = SHARED_DATA / "trec" / "train.csv"
    if not trec.is_file():
        pytest.skip(f"{trec} is absent: the page's example runs on TREC's questions")
    steps = run_worked_example("sentences.md", tmp_path, TREC=str(trec))
    assert [command.split()[:4] for command, _, _ in steps][1:] == [
        ["python", "-m", "simsearch", "store"]] * 3
    for command, shown, printed in steps:
        assert [comparable(line) for line in printed] == [comparable(line) for line in shown], f"$ {command}"


# --- the README's figures ------------------------------------------------------------------------------------------


def test_every_figure_of_the_readmes_summary_is_on_the_page_it_links_to():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    summary = readme.split("In short", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "](docs/" in line]
    assert len(rows) >= 6
    for row in rows:
        measured, where = [cell.strip() for cell in row.split("|")[2:4]]
        page = (REPO_ROOT / re.search(r"\]\((docs/[a-z-]+\.md)", where).group(1)).read_text(encoding="utf-8")
        for figure in re.findall(r"\d[\d,]*\.?\d*", measured):
            assert figure in page, f"README's {figure} ({row.split('|')[1].strip()}) is not on {where}"

