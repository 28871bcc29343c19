"""``python -m voxfit.cli``."""

from voxfit.cli import main

main()
