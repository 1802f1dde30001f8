"""The .rnn grammar ships here as package data (rnn.lark)."""
