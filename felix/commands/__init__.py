"""One module per `felix` verb; each exposes `register(subparsers)`."""
