"""README's Quick start commands, read from README.md (the tests run them word for word).

``python3 tests/system/readme_commands.py run|test`` prints one (``.ci/run`` uses it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Quick start"


def quick_start_commands(readme: Path = README) -> tuple[str, str]:
    """The (run, test) commands: the first two ```sh blocks of the Quick start section."""
    text = readme.read_text(encoding="utf-8")
    start = text.find(f"\n{SECTION}")
    if start < 0:
        raise LookupError(f"{readme}: no '{SECTION}' section")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end >= 0 else len(text)]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    if len(blocks) < 2:
        raise LookupError(f"{readme}: Quick start has {len(blocks)} sh blocks, not 2")
    commands = []
    for block in blocks[:2]:
        lines = [line for line in block.splitlines() if line.strip()]
        if len(lines) != 1:
            raise LookupError(f"{readme}: a Quick start command is {len(lines)} lines, not 1")
        commands.append(lines[0].strip())
    return commands[0], commands[1]


def main(argv: list[str]) -> int:
    """Print the run or the test command."""
    if len(argv) != 1 or argv[0] not in ("run", "test"):
        print("usage: readme_commands.py run|test", file=sys.stderr)
        return 64
    try:
        run, test = quick_start_commands()
    except (OSError, LookupError) as exc:
        print(f"readme_commands: {exc}", file=sys.stderr)
        return 65
    print(run if argv[0] == "run" else test)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
