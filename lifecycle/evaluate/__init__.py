"""`lifecycle evaluate`: intrinsic metrics, benchmark tasks, samples, contamination and the promotion gate."""
