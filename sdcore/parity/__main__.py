"""`python -m sdcore.parity MODEL_DIR ...`: see sdcore/parity/tool.py."""

from sdcore.parity.tool import main

raise SystemExit(main())
