from pond.cli import main

raise SystemExit(main())
