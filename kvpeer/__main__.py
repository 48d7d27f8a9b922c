"""``python -m kvpeer`` is the ``kvpeer`` command."""

import sys

from kvpeer.cli import main

sys.exit(main())
