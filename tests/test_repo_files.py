"""What a reader of the repository is told: the README's test command prints pytest's
summary line (and is what CI runs), and every file the README points to is in the repo."""

import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _readme_test_command() -> str:
    line = next(ln for ln in README.splitlines() if "-m pytest" in ln)
    return line.split("&&")[-1].split("#")[0].strip()


def test_readme_test_command_prints_the_summary_line():
    command = _readme_test_command()
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if "-m pytest" in ln]
    assert ci == [command], "the README's test command must be what CI runs"
    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"].get("addopts", "")
    options = shlex.split(command) + shlex.split(addopts)
    quiet = sum(o.count("q") for o in options if re.fullmatch(r"-q+", o)) + options.count(
        "--quiet")
    # pytest prints "N passed in ..." at -q, not at -qq.
    assert quiet <= 1, f"{command!r} with addopts {addopts!r} hides the summary line"


def test_readme_links_stay_inside_the_repository():
    targets = re.findall(r"\]\(([^)#\s]+)\)", README) + re.findall(r"`((?:\.\./)+[^`]+)`",
                                                                   README)
    assert not [t for t in targets if t.startswith("../")], "points outside the repository"
    for target in targets:
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to missing {target}"
    assert (ROOT / "docs" / "DKV.md").is_file() and (ROOT / "docs" / "BICACHE.md").is_file()
