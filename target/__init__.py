"""nvmetd: target."""
