"""The requirements pyproject.toml names, one a line, for the environments the CI scripts make, so that
each follows pyproject.toml instead of a copy of it.

    python .ci/requirements.py [--build] [--runtime] [--floor] [--test] [--without NAME,...]

--build: build-system.requires (for builds without isolation); --runtime: project.dependencies, with
--floor each at the lowest version its range allows (`numpy>=1.24` as `numpy==1.24`: what the package
promises to work with, which no resolver picks by itself); --test: the test extra. --without drops the
requirements of the named projects. Python < 3.11 needs tomli installed."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib


def project_name(requirement: str) -> str:
    return re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1).lower().replace("_", "-")


def at_floor(requirement: str) -> str:
    """`name>=X[; markers]` as `name==X[; markers]`; anything else has no single floor to pin."""
    spec, _, markers = requirement.partition(";")
    found = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*>=\s*([^,<>=!~\s]+)\s*", spec)
    if not found:
        sys.exit(f"requirements.py: {requirement!r} has no lower bound of the form name>=version")
    return f"{found.group(1)}=={found.group(2)}" + (f";{markers}" if markers else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true")
    parser.add_argument("--runtime", action="store_true")
    parser.add_argument("--floor", action="store_true")
    parser.add_argument("--test", action="store_true")
    parser.add_argument("--without", default="")
    args = parser.parse_args()
    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    reqs = []
    if args.build:
        reqs += pyproject["build-system"]["requires"]
    if args.runtime:
        runtime = pyproject["project"]["dependencies"]
        reqs += [at_floor(r) for r in runtime] if args.floor else runtime
    if args.test:
        reqs += pyproject["project"]["optional-dependencies"]["test"]
    dropped = {name.strip().lower().replace("_", "-") for name in args.without.split(",") if name.strip()}
    print("\n".join(r for r in reqs if project_name(r) not in dropped))


if __name__ == "__main__":
    main()
