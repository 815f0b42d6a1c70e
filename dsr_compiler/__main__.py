import sys

from dsr_compiler.cli import main

sys.exit(main())
