import sys

from videomoco.cli import main

sys.exit(main())
