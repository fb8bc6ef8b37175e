"""``python -m actors.cli``: the ``getgoodtape`` command."""

import sys

from actors.cli import main

sys.exit(main())
