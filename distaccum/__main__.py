import sys

from distaccum.cli import main

sys.exit(main())
