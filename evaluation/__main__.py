"""``python -m erasekit.evaluation``: the same as the ``erasekit-eval`` command."""
import sys

from .cli import main

sys.exit(main())
