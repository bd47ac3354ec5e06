"""nvmetd: backends."""
