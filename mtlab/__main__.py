import sys

# importing mtlab.cli runs mtlab/__init__.py first, which sets the OpenMP wait policy before torch loads
from .cli import main

sys.exit(main())
