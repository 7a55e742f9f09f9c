import sys

from roadshift.cli import main

sys.exit(main())
