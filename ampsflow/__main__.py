from ampsflow.cli import main

raise SystemExit(main())
