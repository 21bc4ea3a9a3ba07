"""PyInstaller entry script for the single-file `cloudless` (see scripts/bundle).

Not cloudless/__main__.py itself: PyInstaller puts the entry script's directory
on the import path, which would make cloudless's subpackages top-level modules.
"""

from cloudless.cli.main import main

main()
