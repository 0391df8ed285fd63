from ktproxy.cli import main

raise SystemExit(main())
