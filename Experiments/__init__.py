"""Experiment drivers on top of the harness: each calls `Main.run(args) -> summary` and nothing below it."""
