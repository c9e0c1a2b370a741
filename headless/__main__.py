"""``python -m erasekit.headless``: the same as the ``erasekit-run`` command."""
import sys

from .cli import main

sys.exit(main())
