import sys

from relaylab.cli import main

sys.exit(main())
