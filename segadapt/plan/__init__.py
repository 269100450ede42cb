"""Dataset plans: what a dataset decides about preprocessing and networks."""
