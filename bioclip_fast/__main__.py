import sys

from bioclip_fast.cli import main

sys.exit(main())
