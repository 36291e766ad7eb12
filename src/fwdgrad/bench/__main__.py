"""``python -m fwdgrad.bench``: the benchmark's command line and its per-configuration worker mode."""

from fwdgrad.bench import main

raise SystemExit(main())
