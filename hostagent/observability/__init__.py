"""What an operator sees of the daemon at work: log context and Prometheus metrics."""
