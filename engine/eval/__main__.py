"""``python -m geoforge.engine.eval`` (the console script ``geoforge-eval``): see :mod:`geoforge.engine.eval.run`."""
from geoforge.engine.eval.run import main

raise SystemExit(main())
