"""``python -m alto``: the same as the ``alto`` command."""

from ._cli import main

main()
