"""Examples that use this project with other libraries (each needs its own optional extra)."""
