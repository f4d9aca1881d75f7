"""edgemoe.report."""
