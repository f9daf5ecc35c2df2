"""``python -m engine.eval``: see :mod:`engine.eval.run`."""
from engine.eval.run import main

raise SystemExit(main())
