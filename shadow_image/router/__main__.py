from shadow_image.router.server import main

raise SystemExit(main())
