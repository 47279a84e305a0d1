"""The manual as the tests read it: the README and the pages of docs/, and their Python
blocks, in the order a reader meets them."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def manual_text() -> str:
    """Every page, one after another."""
    return "\n".join(page.read_text() for page in PAGES)


def python_blocks(page: Path | None = None) -> list[str]:
    """The ```python blocks of one page, or of every page."""
    text = page.read_text() if page is not None else manual_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def python_block(marker: str) -> str:
    """The one Python block of the manual that contains marker."""
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"{len(found)} blocks of the manual with {marker!r}"
    return found[0]
