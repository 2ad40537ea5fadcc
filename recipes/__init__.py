"""Training recipes: the commands that made the checkpoints linrec ships. Nothing in the core imports this package."""
