"""`python -m fusedrnn`: the same command as `fusedrnn`."""

from .cli import main

raise SystemExit(main())
