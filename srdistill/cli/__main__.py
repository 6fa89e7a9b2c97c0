"""``python -m srdistill.cli``: the ``srdistill`` command."""

import sys

from srdistill.cli.main import app

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
