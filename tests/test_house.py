"""The repository as a reader meets it: the paper's files at the top level, standing alone; --help built from DEFAULTS
and their comments; the call path from main() to the loss (ldalign.py -> stages.py -> dpo.py)."""
import ast
import os
import subprocess
import sys
import traceback

import pytest

import dpo
import ldalign
from run import cli
from tests.builders import HERE, MINIMAL_RUN, _minimal_data

# What guide.py, dpo.py and generate.py (and fsdp.py, which they use) may import: any of them copied into other
# code brings nothing of the run folder, the command line or the checkpoints along
PAPER_FILES = ("guide.py", "dpo.py", "generate.py", "fsdp.py")
ALLOWED = set(sys.stdlib_module_names) | {"torch", "transformers", "safetensors", "numpy", "tokenizers", "guide",
                                          "dpo", "generate", "fsdp"}


def _imports(path):
    """The top-level package of every absolute import in the Python file `path`."""
    names = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module.split(".")[0])
    return names


def test_the_papers_files_import_no_run_machinery_and_head_the_top_level():
    """guide.py, dpo.py, generate.py and fsdp.py import nothing from run/ or tools/; the top level holds the paper's
    files and at most 8 modules besides the tests."""
    for name in PAPER_FILES:
        bad = [m for m in _imports(os.path.join(HERE, name)) if m not in ALLOWED]
        assert not bad, (name, bad)
    top = sorted(f for f in os.listdir(HERE) if f.endswith(".py") and f not in ("conftest.py", "test_ldalign.py"))
    assert len(top) <= 8, top
    assert {"ldalign.py", "stages.py", "guide.py", "dpo.py", "generate.py"} <= set(top), top


def test_help_lists_every_default_with_its_comment():
    """`python ldalign.py --help` prints the docstring and the DEFAULTS block as ldalign.py holds it: every key, each
    explained by a comment on its line or right above it."""
    p = subprocess.run([sys.executable, os.path.join(HERE, "ldalign.py"), "--help"], cwd=HERE, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith(ldalign.__doc__.splitlines()[0])
    assert cli.defaults_help(os.path.join(HERE, "ldalign.py")) in p.stdout
    lines = p.stdout.splitlines()
    for key in ldalign.DEFAULTS:
        at = [i for i, line in enumerate(lines) if not line.lstrip().startswith("#")
              and (line.lstrip().startswith(f"{key}=") or f", {key}=" in line)]
        assert at, f"--help does not list {key}"
        assert "#" in lines[at[0]] or lines[at[0] - 1].lstrip().startswith("#"), f"{key}: no comment"


def test_help_survives_edited_comments(tmp_path):
    """defaults_help finds the DEFAULTS assignment with Python's parser: comments rewritten, added or removed around
    and inside it change nothing but themselves."""
    src = open(os.path.join(HERE, "ldalign.py")).read()
    edited = src.replace("# Defaults: the embedded toy run.", "# Any other words.").replace(
        "DEFAULTS = dict(", "# one more line of comment\nDEFAULTS = dict(  # and one here", 1)
    path = tmp_path / "edited.py"
    path.write_text(edited)
    block = cli.defaults_help(str(path))
    assert "# Any other words." in block and "# one more line of comment" in block
    assert all(f"{key}=" in block for key in ldalign.DEFAULTS) and block.rstrip().endswith(")")
    with pytest.raises(ValueError, match="no assignment to NOTHERE"):
        cli.defaults_help(str(path), "NOTHERE")


def test_line_10_from_main_to_the_loss_goes_through_three_files(tmp_path, monkeypatch):
    """Algorithm 1's line 10, followed from ldalign.main() to dpo.ldalign_loss: main -> Stages.update -> dpo.dpo_train
    -> (its loop, one step, the micro-batch's loss) -> ldalign_loss, in ldalign.py, stages.py and dpo.py alone, six
    calls deep."""
    stacks = []
    real = dpo.ldalign_loss

    def spy(*args, **kw):
        if not stacks:
            stacks.append(traceback.extract_stack()[:-1])
        return real(*args, **kw)
    monkeypatch.setattr(dpo, "ldalign_loss", spy)
    ldalign.main(["--out", str(tmp_path / "run"), "--data", _minimal_data(tmp_path)] + MINIMAL_RUN + ["--T", "1"])
    frames = stacks[0]
    first = max(i for i, f in enumerate(frames) if f.name == "main" and f.filename.endswith("ldalign.py"))
    path = [(os.path.basename(f.filename), f.name) for f in frames[first:]]
    assert {file for file, _ in path} == {"ldalign.py", "stages.py", "dpo.py"}, path
    assert [name for _, name in path][:3] == ["main", "update", "dpo_train"], path
    assert len(path) <= 6, path
