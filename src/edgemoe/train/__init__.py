"""edgemoe.train."""
