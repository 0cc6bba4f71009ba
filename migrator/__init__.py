"""migrator package."""
