"""``python -m pysonic`` runs the command line."""
import sys

from pysonic.cli import main

sys.exit(main())
