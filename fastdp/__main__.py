"""``python -m fastdp``: the same as the ``fastdp`` command."""

import sys

from fastdp.cli import main

sys.exit(main())
