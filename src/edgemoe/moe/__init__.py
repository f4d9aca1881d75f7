"""edgemoe.moe."""
