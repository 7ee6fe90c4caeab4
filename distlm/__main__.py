import sys

from distlm.cli import main

sys.exit(main())
