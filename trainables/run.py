"""The old name of the single-trial CLI: ``python -m trainables.run ...`` runs trainables.cli unchanged."""
import sys

from trainables.cli import config_from_args, main, parser  # noqa: F401 (the old module's names)

if __name__ == "__main__":
    sys.exit(main())
