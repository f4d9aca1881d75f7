from edgemoe.testing.fake_openai import main

raise SystemExit(main())
