import sys

from distaccum.tools.cli import main

sys.exit(main())
