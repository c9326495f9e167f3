"""Privacy: DP mechanisms and accountants (a foundation for the tokenizer, DP-SGD and federation)."""
