"""``python -m annotator``: the ``annotate`` command without the console script (e.g. under ``ray job submit``)."""

from annotator.cli import main

main()
