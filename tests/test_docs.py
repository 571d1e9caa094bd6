"""Every code block in README.md and docs/*.md runs, and every command they show parses.

* ```python blocks are executed, one test per block (id ``file:line``), each in a fresh namespace
  and a temporary working directory: blocks are self-contained, so a reader can copy any one of
  them. The code is compiled with the markdown's line numbers, so a traceback points at the line
  of the guide. A block preceded by ``<!-- not-run: REASON -->`` is skipped with that reason (kept
  for what CI cannot do, such as a GPU). A block preceded by ``<!-- run-with: torchrun ARGS -->``
  is a script for several processes: it runs as a file under ``torchrun ARGS``.
* Command lines in bash / console / plain blocks are not run (they train for minutes); each
  ``gradnoise ...`` line is parsed by the real argument parser (``gradnoise.cli.build_parser``),
  workloads and ``--model`` files are checked to exist, ``make X`` names a Makefile target, and
  ``--flags`` of a ``python path/to/script.py`` line appear in that script.
* The option table of docs/profile.md matches the parser (names and defaults), and every
  ``gradnoise.a.b`` name written in inline code in the guides resolves.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")
RUN_WITH = re.compile(r"<!--\s*run-with:\s*torchrun\s+(.*?)\s*-->")
SHELL = {"bash", "sh", "shell", "console", ""}
# packages of optional extras (all in the dev extra that `make test` installs)
OPTIONAL = {"trl", "transformers", "datasets", "tokenizers", "lightning", "tensorboard"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # line of the opening fence
    lang: str
    code: str
    before: str  # the last non-blank line above the fence

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def not_run(self) -> str | None:
        match = NOT_RUN.search(self.before)
        return match.group(1) if match else None

    @property
    def torchrun(self) -> list[str] | None:
        """torchrun's arguments when the block is a script for several processes."""
        match = RUN_WITH.search(self.before)
        return shlex.split(match.group(1)) if match else None


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        above = [line for line in text[: match.start()].splitlines() if line.strip()]
        line = text.count("\n", 0, match.start()) + 1
        lang = match.group(1).lower()
        found.append(Block(path, line, lang, match.group(2), above[-1] if above else ""))
    return found


ALL = [block for path in GUIDES for block in blocks(path)]
PYTHON = [block for block in ALL if block.lang == "python"]
COMMANDS = [block for block in ALL if block.lang in SHELL]


def run_block(block: Block) -> dict:
    """Execute one python block in a fresh namespace; its line numbers are the markdown's."""
    namespace = {"__name__": "__docs__"}
    source = "\n" * block.line + block.code
    exec(compile(source, str(block.path), "exec"), namespace)
    return namespace


def run_script(block: Block) -> str:
    """Run a block as a script under torchrun (``torch.distributed.run``) in the working dir."""
    script = Path("block.py")
    script.write_text("\n" * block.line + block.code)
    command = [sys.executable, "-m", "torch.distributed.run", *block.torchrun, str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, f"{block.id} under torchrun:\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A temporary working directory, the RNG and the rule registry restored afterwards."""
    import torch

    from gradnoise.layers import registry

    monkeypatch.chdir(tmp_path)
    rules = dict(registry._RULES)
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng():
        yield
    torch.set_default_dtype(dtype)
    registry._RULES.clear()
    registry._RULES.update(rules)


def test_the_guides_have_python_blocks_and_few_are_not_run():
    assert len(PYTHON) >= 16
    assert sum(block.not_run is not None for block in PYTHON) <= 2


@pytest.mark.parametrize("block", PYTHON, ids=[block.id for block in PYTHON])
def test_python_block_runs(block, isolated, capsys):
    if block.not_run:
        pytest.skip(f"{block.id}: {block.not_run}")
    try:
        if block.torchrun:
            run_script(block)
        else:
            run_block(block)
    except ModuleNotFoundError as error:
        if error.name.split(".")[0] not in OPTIONAL:
            raise
        pytest.skip(f"{block.id}: needs the optional package {error.name!r}")


def _command_lines(block: Block) -> list[str]:
    lines = []
    for raw in block.code.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line.startswith("#") or not line:
            continue
        lines.append(line)
    return lines


def _check_gradnoise_command(argv: list[str]) -> None:
    from gradnoise.cli import build_parser
    from gradnoise.workloads import WORKLOADS

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # argparse reports the problem on stderr
        raise AssertionError(f"`gradnoise {' '.join(argv)}` does not parse") from exit
    if getattr(args, "workload", None) is not None:
        assert args.workload in WORKLOADS, f"unknown workload {args.workload!r}"
    model = getattr(args, "model", None)
    if model and model.split(":")[0].endswith(".py"):
        module, factory = model.rsplit(":", 1)
        assert (ROOT / module).is_file(), f"{module} does not exist"
        assert re.search(rf"^def {factory}\(", (ROOT / module).read_text(), re.M), model


def _check_command(line: str) -> bool:
    """Check one command line; False when it is not a command this test knows."""
    try:
        words = shlex.split(line)
    except ValueError:  # unbalanced quotes: prose or a file tree, not a command
        return False
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=1 ...
        words = words[1:]
    if not words:
        return False
    if words[0] == "gradnoise":
        _check_gradnoise_command(words[1:])
    elif words[0].endswith("python") and words[1:3] == ["-m", "gradnoise"]:
        _check_gradnoise_command(words[3:])
    elif words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert set(words[1:]) <= set(targets), f"{line}: Makefile targets are {targets}"
    elif words[0].endswith("python") and len(words) > 1 and words[1].endswith(".py"):
        script = ROOT / words[1]
        assert script.is_file(), f"{words[1]} does not exist"
        source = script.read_text()
        for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert f'"{flag}"' in source, f"{words[1]} has no option {flag}"
    else:
        return False
    return True


@pytest.mark.parametrize("block", COMMANDS, ids=[block.id for block in COMMANDS])
def test_command_block_names_real_commands_and_flags(block):
    checked = [line for line in _command_lines(block) if _check_command(line)]
    # a plain fence may be a diagram or a file tree; a bash block must hold a known command
    assert checked or not block.lang, f"{block.id}: no command this test can check"


def _profile_options() -> dict[str, object]:
    from gradnoise.cli import build_parser

    parser = build_parser()
    profile = next(
        action.choices["profile"] for action in parser._actions if action.dest == "command"
    )
    return {
        option: action.default
        for action in profile._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def test_profile_option_table_matches_the_parser():
    table = (ROOT / "docs/profile.md").read_text()
    rows = re.findall(r"^\| `(--[\w-]+)[^`]*` \|\s*([^|]*?)\s*\|", table, re.M)
    options = _profile_options()
    assert {name for name, _ in rows} == set(options), "docs/profile.md's table vs --help"
    for name, default in rows:
        default = default.strip().strip("`")
        if default and options[name] not in (None, False):
            assert default == str(options[name]), (
                f"{name}: table {default!r}, parser {options[name]!r}"
            )


INLINE = re.compile(r"`(gradnoise(?:\.[A-Za-z_]\w*)+)")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_gradnoise_name_in_the_guides_exists():
    names = {name for path in GUIDES for name in INLINE.findall(path.read_text())}
    assert len(names) > 20
    missing = sorted(name for name in names if not _resolves(name))
    assert not missing, f"named in the guides but not in the package: {missing}"


def _public_callables() -> dict[str, object]:
    import gradnoise

    found = {}
    for module in [gradnoise, *(importlib.import_module(f"gradnoise.{m}") for m in SUBPACKAGES)]:
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if callable(obj):
                found.setdefault(name, obj)
    return found


SUBPACKAGES = [
    "control",
    "data",
    "estimators",
    "evaluation",
    "optim",
    "rl",
    "sampled",
    "stats",
    "monitor",
    "workloads",
]
CALL = re.compile(r"\b([A-Za-z_]\w*)\(([^()`]*)\)")


def test_keywords_written_in_inline_calls_exist():
    """`GumbelSoftmax(tau=...)`-style slips: every `name=` in an inline call is a real keyword."""
    import inspect

    public = _public_callables()
    wrong = []
    for path in GUIDES:
        for span in re.findall(r"`([^`\n]+)`", path.read_text()):
            for name, args in CALL.findall(span):
                if name not in public:
                    continue
                try:
                    params = inspect.signature(public[name]).parameters
                except (TypeError, ValueError):
                    continue
                if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                    continue
                for keyword in re.findall(r"(?:^|,)\s*(\w+)\s*=", args):
                    if keyword not in params:
                        wrong.append(f"{path.name}: `{span}` ({name} has no {keyword!r})")
    assert not wrong, wrong


PATH_IN_TEXT = re.compile(
    r"(?<![\w/.])((?:src|tests|examples|benchmarks|docs)/[\w/.-]*\.\w+)(?![\w{])"
)
HYPOTHETICAL = {"src/gradnoise/layers/prelu.py"}  # the README's "adding a rule" example


def test_every_repository_path_in_the_guides_exists():
    missing = sorted(
        f"{path.name}: {name}"
        for path in GUIDES
        for name in set(PATH_IN_TEXT.findall(path.read_text())) - HYPOTHETICAL
        if not (ROOT / name).exists()
    )
    assert not missing, missing
