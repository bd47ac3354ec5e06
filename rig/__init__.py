"""nvmetd: rig."""
