import sys

from autoq.cli import main

sys.exit(main())
