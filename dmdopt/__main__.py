import sys

from dmdopt.cli import main

sys.exit(main())
