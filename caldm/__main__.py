import sys

from caldm.cli import main

sys.exit(main())
