import sys

from scanfit._cli import main

sys.exit(main())
