"""Pure decisions: values in, values out. No I/O, no clock, no environment; tests call them with plain values."""
