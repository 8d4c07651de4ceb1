"""`python -m ttt_core …`: the TTT Lens command line (see ttt_core.cli)."""

from ttt_core.cli import main

raise SystemExit(main())
