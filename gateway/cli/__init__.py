"""Command-line commands, one module per topic; each exposes `register(subparsers)`."""
