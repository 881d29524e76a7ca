"""The docs check: the README stays short, its links resolve, and every command in it is run, here
or by CI. The quick-start commands (tiny models, offline) are executed as written, with only their
outputs redirected to a temporary folder; commands that need a GPU or downloaded weights are
composed (every key and value checked by Hydra) or, for the fetch script, checked against its
asset table; the install and test commands are what CI's `.ci/run` runs.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 250
TINY_MODELS = ("model=flux-tiny",)  # plus the default model (dit-tiny) when no model= is given


def bash_commands(text: str) -> list[str]:
    """Every command of the ```bash blocks: continuation lines joined, comments and env prefixes kept."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def split_chain(command: str) -> list[list[str]]:
    """`a && b` -> [[a...], [b...]], each without leading VAR=value assignments."""
    parts = []
    for piece in command.split("&&"):
        words = shlex.split(piece)
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words = words[1:]
        parts.append(words)
    return parts


def kind(words: list[str]) -> str:
    """How a README command is checked: ci (install / tests), run (executed here), compose, fetch."""
    if words[:2] == ["pip", "install"] or words[:3] == ["python", "-m", "pytest"]:
        return "ci"
    if words[:2] == ["python", "scripts/fetch_assets.py"]:
        return "fetch"
    if words[0] == "torchrun" or words[:2] == ["python", "scripts/calibrate_tau.py"]:
        return "compose"
    if words[:2] == ["python", "run.py"]:
        models = [w for w in words if w.startswith("model=")]
        return "run" if not models or models[-1] in TINY_MODELS else "compose"
    if words[:2] in (["python", "scripts/make_tables.py"], ["python", "scripts/make_figures.py"]):
        return "run"
    if words[:2] == ["bash", "scripts/gpu_check.sh"]:
        return "compose"
    return "unknown"


def readme_commands() -> list[list[str]]:
    return [words for command in bash_commands(README.read_text()) for words in split_chain(command)]


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) < MAX_README_LINES
    for path in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)]+)\)", path.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            where = (path.parent / file).resolve() if file else path
            assert where.exists(), f"{path.name}: link to missing {target}"
            if anchor and where.suffix == ".md":
                headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
                            for h in re.findall(r"(?m)^#+ (.*)$", where.read_text())}
                assert anchor in headings, f"{path.name}: no heading #{anchor} in {where.name}"


def test_every_readme_command_is_checked_and_ci_runs_the_test_command():
    commands = readme_commands()
    assert commands
    unknown = [" ".join(w) for w in commands if kind(w) == "unknown"]
    assert not unknown, f"README commands no test or CI runs: {unknown}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]" && python -m pytest' in ci
    assert 'pip install -e ".[test]" && python -m pytest' in README.read_text()


def test_fetch_commands_name_known_assets():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import fetch_assets
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    known = {e.name for e in fetch_assets.ENTRIES} | set(fetch_assets.GROUPS)
    for words in readme_commands():
        if kind(words) == "fetch":
            names = [w for w in words[2:] if not w.startswith("-")]
            assert names and set(names) <= known, f"unknown assets in: {' '.join(words)}"


def _overrides(words: list[str]) -> tuple[str, list[str]]:
    """(config name, Hydra overrides) of a run.py / calibrate_tau.py / torchrun command."""
    if words[0] == "torchrun":
        words = ["python", *words[next(i for i, w in enumerate(words) if w.endswith("run.py")):]]
    config = "calibrate" if words[1].endswith("calibrate_tau.py") else "run"
    return config, [w for w in words[2:] if w != "-m" and "=" in w]


def test_gpu_and_weight_commands_compose():
    """Commands that need a GPU or downloaded weights: Hydra composes them (every key exists and is
    typed), and the multirun sweeps' values are each composed too."""
    checked = 0
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for words in readme_commands():
            if kind(words) != "compose" or words[0] == "bash":
                continue
            config, overrides = _overrides(words)
            variants = [overrides]
            for i, o in enumerate(overrides):  # a sweep a=x,y: each value on its own
                key, _, value = o.partition("=")
                if "," in value and "-m" in words:
                    variants = [overrides[:i] + [f"{key}={v}"] + overrides[i + 1:] for v in value.split(",")]
            for ov in variants:
                cfg = compose(config, overrides=ov)
                assert cfg.model.name
                checked += 1
    assert checked >= 4


def test_quick_start_commands_run_as_written(tmp_path):
    """The README's commands on the tiny models, in order, each exiting 0; outputs go to tmp_path."""
    ran = 0
    for words in readme_commands():
        if kind(words) != "run":
            continue
        if words[1] == "run.py":
            extra = [f"paths.outputs={tmp_path}/outputs", f"paths.runs_csv={tmp_path}/runs.csv"]
        elif words[1].endswith("make_tables.py"):
            extra = ["--csv", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "tables")]
        else:
            extra = ["--runs", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "figures")]
        proc = subprocess.run([sys.executable, *words[1:], *extra], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{' '.join(words)}:\n{proc.stderr[-3000:]}"
        ran += 1
    assert ran >= 5
    assert (tmp_path / "runs.csv").exists() and any((tmp_path / "tables").glob("*.md"))


@pytest.mark.parametrize("words", [["python", "run.py", "model=dit-xl"], ["python", "run.py"],
                                   ["torchrun", "--nproc_per_node=8", "run.py", "model=dit-xl"],
                                   ["python", "scripts/make_tables.py"], ["python", "scripts/fetch_assets.py", "x"],
                                   ["pip", "install", "-e", "."], ["ls"]])
def test_command_kinds(words):
    expected = {"model=dit-xl": "compose", "torchrun": "compose", "make_tables": "run", "fetch": "fetch",
                "pip": "ci", "ls": "unknown"}
    key = next((k for k in expected if any(k in w for w in words)), None)
    assert kind(words) == (expected[key] if key else "run")
