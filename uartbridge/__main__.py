"""``python -m uartbridge``: the same as the ``uartbridge`` command."""

from .cli import main

raise SystemExit(main())
