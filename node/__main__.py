from swarm_node.cli import main

raise SystemExit(main())
