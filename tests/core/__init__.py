"""Pure decisions, tested with plain values (a few real ffmpeg runs confirm the plan's facts)."""
