"""The example commands the project documents: in each script's docstring, README.md and docs/*.md.

A command is a line (with its `\\` continuations) that runs `python <dir>/<script>.py ...` (also
`.venv/bin/python`, `accelerate launch`, with leading `VAR=value`s); it is returned as the script's
path and its argument tokens, shell comments and `[...]` optional brackets removed."""
from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = ("offline", "eval", "train", "infer", "scripts", "bench")
_COMMAND = re.compile(r"(?:^|[\s`(])(?:\S*python3?|accelerate launch)\s+((?:%s)/\w+\.py)(?=\s|$|`)"
                      % "|".join(SCRIPT_DIRS))


@dataclass(frozen=True)
class Command:
    source: str  # where it is documented, e.g. "offline/encode_kv.py docstring" or "README.md:145"
    script: str  # repo-relative path of the script it runs
    args: tuple[str, ...]

    def flags(self) -> list[str]:
        """The option names used (`--x`, `--x=v` -> `--x`; `-h` style short options included)."""
        return [a.split("=", 1)[0] for a in self.args if a.startswith("-") and len(a) > 1 and not a[1].isdigit()]


def scripts_with_main() -> list[Path]:
    """Every script with an `if __name__ == "__main__":` block."""
    return sorted(p for d in SCRIPT_DIRS for p in (ROOT / d).glob("*.py")
                  if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8"))


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with backslash continuations joined."""
    out, buf, start = [], "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not buf:
            start = number
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def commands_in(text: str, source: str) -> list[Command]:
    found = []
    for number, line in _logical_lines(text):
        match = _COMMAND.search(line)
        if not match:
            continue
        rest = line[match.end(1):].split("`", 1)[0]  # inline code in markdown ends at the backtick
        tokens = [t.strip("[]") for t in shlex.split(rest, comments=True)]
        found.append(Command(f"{source}:{number}", match.group(1), tuple(t for t in tokens if t)))
    return found


def documented_commands() -> list[Command]:
    """Every documented example command of the repository."""
    commands = []
    for path in scripts_with_main():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        commands += commands_in(doc, f"{path.relative_to(ROOT)} docstring")
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        commands += commands_in(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    return commands
