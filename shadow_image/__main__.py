from shadow_image.sshd import main

raise SystemExit(main())
