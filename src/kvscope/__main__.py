from kvscope.cli.main import main

raise SystemExit(main())
