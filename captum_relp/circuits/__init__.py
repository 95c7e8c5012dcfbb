"""Circuit discovery."""
