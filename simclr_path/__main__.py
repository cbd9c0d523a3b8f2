import sys

from simclr_path.cli import main

sys.exit(main())
