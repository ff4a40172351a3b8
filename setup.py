"""setuptools entry: the metadata is in pyproject.toml; this adds the optional mypyc build.

See build_backend/uartbridge_build.py: the hot modules are compiled with mypyc where a C
compiler works (``UARTBRIDGE_PURE=1`` forces the pure build, ``UARTBRIDGE_COMPILED=1`` makes
a failure to compile an error), and the pure-Python package is built otherwise.
"""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "build_backend"))

from uartbridge_build import setup_arguments

setup(**setup_arguments())
