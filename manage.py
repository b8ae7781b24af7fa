#!/usr/bin/env python
import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.base")
    from pathlib import Path

    from controlplane.lib.datadir import missing_installation

    problem = missing_installation(sys.argv, dict(os.environ), Path(__file__).parent / "var")
    if problem:
        sys.exit(problem)
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
