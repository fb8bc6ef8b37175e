"""What a user or operator runs: the CLI, the operator's checks, the wire contract."""
