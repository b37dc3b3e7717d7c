"""`python -m bioclip_fast.cli ...` (same as `bioclip-fast ...` and `python -m bioclip_fast ...`)."""
import sys

from bioclip_fast.cli import main

sys.exit(main())
