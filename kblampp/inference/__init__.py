"""Loading and generation shared by evaluation and serving (neither imports the other)."""
