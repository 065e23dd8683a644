"""What every method family shares: reply checks and aggregation, checkpoints, private state, results, bytes, DP."""
