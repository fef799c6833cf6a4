"""`lifecycle cost`: what the lifecycle costs, from measured runs and configured prices."""
