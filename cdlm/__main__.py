"""``python -m cdlm``: the same as the ``cdlm`` command."""

import sys

from cdlm.cli import main

sys.exit(main())
