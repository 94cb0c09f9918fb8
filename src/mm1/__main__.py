import sys

from mm1.cli import main

sys.exit(main())
