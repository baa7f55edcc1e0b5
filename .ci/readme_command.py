"""Print one of the README's two set-up commands ("main" or "test"): the first two lines of its first code block.

CI runs exactly the README's test command, so the two cannot drift apart.
"""

import pathlib
import sys


def commands(readme: str) -> list[str]:
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    block = []
    for line in lines[start + 1 :]:
        if line.startswith("```"):
            break
        if line.strip() and not line.lstrip().startswith("#"):
            block.append(line.strip())
    return block[:2]


if __name__ == "__main__":
    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    main, test = commands(text)
    print({"main": main, "test": test}[sys.argv[1]])
