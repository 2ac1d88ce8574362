import sys

from cirjax.cli import main

sys.exit(main())
