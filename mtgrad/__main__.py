from mtgrad.cli import main

raise SystemExit(main())
