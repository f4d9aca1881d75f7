"""edgemoe.edge."""
