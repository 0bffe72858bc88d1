import sys

from lvm_jax.bench.cli import main

sys.exit(main())
