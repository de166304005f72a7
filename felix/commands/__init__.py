"""One module per `felix` verb; each exposes `register(subparsers, help)` (`felix.cli.VERBS` lists them)."""
