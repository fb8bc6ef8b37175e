"""The bus contract on both buses, dead-letter replay, queue settings on the real broker."""
