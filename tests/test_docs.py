"""The docs as a specification: their tables match the code, their links resolve, their commands exist.

Pages checked: README.md, every docs/*.md and docker/README.md.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from common.config import _SPEC, NODE_CONFIG_KEYS
from scripts import simulate

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "docker" / "README.md"]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first table under ``heading``: first cell's `key` -> the other cells."""
    section = text.split(heading, 1)[1]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        match = re.match(r"\| `([^`]+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def shown_default(value) -> str:
    """A default as the configuration page writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


def test_the_configuration_page_lists_every_run_config_key_with_its_default():
    rows = table_rows((REPO / "docs" / "configuration.md").read_text(), "## The run config")
    with open(REPO / "pyproject.toml", "rb") as f:
        defaults = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert list(rows) == list(_SPEC), "docs/configuration.md and common/config.py's _SPEC differ (keys or order)"
    assert list(defaults) == list(_SPEC), "pyproject.toml's [tool.flwr.app.config] and _SPEC differ"
    wrong = {key: (cells[0], shown_default(defaults[key])) for key, cells in rows.items()
             if cells[0] != shown_default(defaults[key])}
    assert not wrong, f"defaults in docs/configuration.md differ from pyproject.toml (docs, code): {wrong}"


def test_the_configuration_page_lists_every_node_config_key_with_its_default():
    rows = table_rows((REPO / "docs" / "configuration.md").read_text(), "## The node config")
    assert list(rows) == list(NODE_CONFIG_KEYS)
    assert {key: cells[0] for key, cells in rows.items()} == {
        key: (f"the run config's `{key}`" if key == "device" else default)
        for key, (default, _) in NODE_CONFIG_KEYS.items()
    }


def headings(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings (code blocks left out)."""
    text = FENCE.sub("", page.read_text())
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in headings(file):
            broken.append(f"{target} (no heading #{anchor} in {file.relative_to(REPO)})")
    assert not broken, f"{page_id(page)}: {broken}"


def commands(page: Path) -> list[list[str]]:
    """Every shell command in the page: lines of its code blocks (continuations joined) and inline code."""
    text = page.read_text()
    lines = []
    for block in FENCE.findall(text):
        if not block.startswith(("```bash", "```sh")):
            continue
        joined = re.sub(r"\\\n\s*", " ", "\n".join(block.splitlines()[1:-1]))
        lines += joined.splitlines()
    lines += INLINE_CODE.findall(FENCE.sub("", text))
    found = []
    for line in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue  # not a command (an inline formula, a heredoc line)
        while words and re.match(r"^[A-Z_]+=", words[0]):
            words = words[1:]  # VAR=value command ...
        if words:
            found.append(words)
    return found


def all_commands() -> list[tuple[str, list[str]]]:
    return [(page_id(page), words) for page in PAGES for words in commands(page)]


# Runs `python -m MODULE ARGS` up to its argument parsing, then exits 0: an unknown module, flag or a
# value of the wrong type fails as it would for a user, and no benchmark or run starts.
PARSE_ONLY = """
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, args=None, namespace=None):
    parse(self, args, namespace)
    sys.exit(0)
argparse.ArgumentParser.parse_args = parse_then_stop
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def python_module_commands() -> list[tuple[str, list[str]]]:
    return [(page, words[2:]) for page, words in all_commands() if words[:2] == ["python", "-m"]]


def test_the_docs_name_python_module_commands_to_check():
    modules = {args[0] for _, args in python_module_commands()}
    assert {"bench.distill_benchmark", "bench.round_overhead", "bench.faults", "bench.privacy"} <= modules


@pytest.mark.parametrize("page, args", python_module_commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_python_module_command_in_the_docs_exists_and_takes_its_arguments(page, args):
    done = subprocess.run([sys.executable, "-c", PARSE_ONLY, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{page}: python -m {' '.join(args)}: {done.stderr[-2000:]}"


def test_every_console_script_the_docs_run_is_installed():
    bin_dir = Path(sys.executable).parent
    named = {words[0] for _, words in all_commands() if re.fullmatch(r"fl-distill-[a-z-]+|flower-[a-z-]+|flwr", words[0])}
    assert {"flwr", "flower-superlink", "fl-distill-supernode"} <= named
    missing = sorted(name for name in named if not (bin_dir / name).exists())
    assert not missing, f"commands in the docs with no console script in {bin_dir}: {missing}"


def test_every_run_sh_command_in_the_docs_is_a_valid_run(capsys):
    import torch

    runs = [(page, words[1:]) for page, words in all_commands() if words[0] == "./run.sh"]
    assert len(runs) >= 3
    for page, args in runs:
        if args in ([], ["--help"]):
            continue
        try:
            simulate.parse_args(args)
        except SystemExit as exit_:
            refusal = capsys.readouterr().err
            if not torch.cuda.is_available() and "no CUDA device is visible" in refusal:
                continue  # a GPU command (docs/gpu.md), refused here for that reason alone
            pytest.fail(f"{page}: ./run.sh {' '.join(args)} is refused (exit {exit_.code}): {refusal[-500:]}")


@pytest.mark.parametrize("script, expected", [("./run.sh", "--run-config"), ("./test.sh", "pytest")])
def test_readmes_quick_start_commands_answer_help(script, expected):
    done = subprocess.run([script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout


def test_a_simulation_of_fewer_clients_than_min_nodes_is_refused_at_once_naming_both():
    started = time.monotonic()
    done = subprocess.run(["./run.sh", "--clients", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 30
    assert done.returncode == 2
    assert "--clients = 1 is fewer than the run config's min-nodes = 2" in done.stderr
    assert "--run-config \"min-nodes=1\"" in done.stderr and "Traceback" not in done.stderr


def test_a_bad_run_config_value_is_refused_before_any_process_starts(capsys):
    with pytest.raises(SystemExit) as exit_:
        simulate.parse_args(["--run-config", "dirichlet-alpha=-1"])
    assert exit_.value.code == 2
    assert "'dirichlet-alpha' = -1.0 is not allowed; use a number > 0" in capsys.readouterr().err


def test_readme_fits_on_two_screens():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150
