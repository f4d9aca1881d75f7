"""edgemoe.collab."""
