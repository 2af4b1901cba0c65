"""``python -m clsp``: the same as the ``clsp`` command (handy under ``accelerate launch -m``)."""

from clsp.cli import main

main()
