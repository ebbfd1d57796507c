"""benchmarks/RESULTS.md, the one home of every measured number: its sections are written here and only here.

A section is a `## ` heading and what follows up to the next one. `write_section` puts a section in the place of the
earlier one with the same heading (or adds it), so a benchmark run again replaces its own numbers and leaves every
other section as it was.
"""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = re.compile(r"^## .*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
PREAMBLE = (
    "# Benchmarks\n\nEvery measured number of the project. Each section names the command that wrote it; running it "
    "again replaces that section and keeps the others.\n\n"
)


def sections(text: str) -> dict[str, str]:
    """{heading (without '## '): the section's text} of a RESULTS.md, in order."""
    return {match.group(0).splitlines()[0][3:].strip(): match.group(0) for match in SECTION.finditer(text)}


def write_section(heading: str, body: str, path: Path = RESULTS, first: bool = False) -> None:
    """Put `## heading` and `body` into `path` in place of the section of the same heading; a new section goes at
    the end, or before every other section where `first`."""
    text = path.read_text() if path.is_file() else PREAMBLE
    section = f"## {heading}\n\n{body.strip()}\n\n"
    earlier = sections(text).get(heading)
    if earlier is not None:
        text = text.replace(earlier, section, 1)
    elif first and SECTION.search(text):
        start = SECTION.search(text).start()
        text = text[:start] + section + text[start:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
