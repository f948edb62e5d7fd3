"""Build-time check of an image: the installed packages hold every file of the source packages.

Run as `python check_install.py SOURCE_DIR` after `pip install SOURCE_DIR`. A non-editable install
keeps only what the build backend packs; data files (Alembic migrations, the dashboard's static
files) need package-data in pyproject.toml. A missing one fails the image build here rather than
the service at run time. Also imports each service's entry module and the CLI.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

PACKAGES = ("gradalign_common", "gradalign_tools", "services")
ENTRY_MODULES = ("gradalign_tools.cli", "services.scheduler.app", "services.rollout.server", "services.scoring.server", "services.trainer.server")
SKIP_PARTS = {"__pycache__"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


def main(source: Path) -> int:
    missing: list[str] = []
    for package in PACKAGES:
        installed_root = Path(importlib.import_module(package).__file__).resolve().parent
        if installed_root.is_relative_to(source.resolve()):
            print(f"error: {package} is imported from the source tree {installed_root}, not from the install", file=sys.stderr)
            return 1
        for path in sorted((source / package).rglob("*")):
            if not path.is_file() or SKIP_PARTS & set(path.parts) or path.suffix in SKIP_SUFFIXES:
                continue
            relative = path.relative_to(source / package)
            if not (installed_root / relative).is_file():
                missing.append(f"{package}/{relative}")
    if missing:
        print("error: the install lacks these files of the source (add them to package-data in pyproject.toml):", file=sys.stderr)
        for name in missing:
            print(f"  {name}", file=sys.stderr)
        return 1
    for module in ENTRY_MODULES:
        importlib.import_module(module)
    print(f"install complete: {', '.join(PACKAGES)}; entry modules import")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
