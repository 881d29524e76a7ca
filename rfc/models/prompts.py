"""Prompt sets for text-to-image models: one prompt per line of ``prompts/<name>.txt``.

Sample i of a run is drawn for prompt i (i modulo the set's size when more samples than prompts
are asked for) from the noise of stream (seed, i), so every method sees the same prompt with the
same noise. A set is named in rows by its name and the digest of its text, so a changed file is
a different setting, never silently the same one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from rfc.utils.errors import ConfigError

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]
    digest: str  # sha256 of the file's text, 12 hex digits

    @property
    def id(self) -> str:
        """How rows name the set: "drawbench:1a2b3c4d5e6f"."""
        return f"{self.name}:{self.digest}"

    def for_samples(self, n: int) -> list[str]:
        """The prompt of each of the first ``n`` samples."""
        return [self.prompts[i % len(self.prompts)] for i in range(n)]


def load_prompts(name: str, folder: Path = PROMPTS_DIR) -> PromptSet:
    """The prompt set ``name`` (a file ``<folder>/<name>.txt``, or a path to a .txt file)."""
    path = Path(name) if name.endswith(".txt") else folder / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
        raise ConfigError(f"prompts={name}: no prompt file {path} (known sets: {', '.join(known) or 'none'}; or give "
                          "a path to a .txt file with one prompt per line)")
    text = path.read_text(encoding="utf-8")
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise ConfigError(f"prompts={name}: {path} holds no prompt (one per line)")
    return PromptSet(path.stem, prompts, hashlib.sha256(text.encode()).hexdigest()[:12])
