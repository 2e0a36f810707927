import sys

from megatron_microep.cli import main

sys.exit(main())
