"""``python -m nmperm_plugin.cli``: the ``nmperm`` command."""

import sys

from .commands import main

sys.exit(main())
