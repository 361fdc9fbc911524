"""Pilot's commands: one module per command group; each registers its subparsers."""
