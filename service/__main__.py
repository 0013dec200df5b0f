"""``python -m service``: the ``calibserve`` command line."""

from service.cli import main

raise SystemExit(main())
