"""Print ``name==floor`` for the named dependencies of pyproject.toml (the package's own and
its extras'), for ``make test-lowest``: a pip constraints file of the declared floors."""

import re
import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
floors = {}
for requirement in requirements:
    match = re.match(r"([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*[^;]*?>=\s*([0-9][^,;\s]*)", requirement)
    if match:
        floors[match[1].lower()] = match[2]
for name in sys.argv[1:]:
    if name not in floors:
        sys.exit(f"pyproject.toml declares no floor for {name!r}")
    version = floors[name]
    print(f"{name}=={version}")
