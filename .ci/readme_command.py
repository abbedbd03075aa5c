"""Print one of README.md's Quick start commands, so CI runs exactly what users copy.

    python3 .ci/readme_command.py main   # the line after <!-- ci: main -->
    python3 .ci/readme_command.py test   # the line after <!-- ci: test -->

The command is the first line of the fenced block that follows the marker; exits 1 with one
line when the marker or its block is missing.
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def command(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- ci: {re.escape(name)} -->\s*```[a-z]*\n(.+?)\n", text)
    if found is None:
        raise SystemExit(f"README.md has no command marked <!-- ci: {name} -->")
    return found.group(1).strip()


if __name__ == "__main__":
    print(command(sys.argv[1]))
