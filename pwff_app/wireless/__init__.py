"""The simulated wireless link: pure channel math, the Flower glue (client mod + Grid wrapper), per-round statistics."""
