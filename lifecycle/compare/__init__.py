"""`lifecycle compare`: runs side by side, joined by lineage across stages."""
