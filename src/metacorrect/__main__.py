"""``python -m metacorrect`` is the ``metacorrect`` command."""

import sys

from .cli import main

sys.exit(main())
