import sys

from cdlm.cli import main

sys.exit(main())
