"""Pure decisions: no I/O, no clock of their own (time is always passed in)."""
