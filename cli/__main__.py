"""``python -m cli``: the same as the ``fedgen`` console script."""

from cli.app import main

main()
