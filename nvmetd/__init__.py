"""nvmetd: nvmetd."""
