"""What each silo's data was worth: Shapley contributions (exact, sampled, in-run), what each silo
gained by joining, payouts, and silos that harm the model (`fedlm value RUN`).

- `shapley`: the game arithmetic (exact / sampled Shapley, leave-one-out, largest remainder, ranks).
- `compute`: from the silos' scores of coalition models to values, flags and payouts.
- `run`: `value_run(RUN, method=...)`: retrain or read the coalitions, score them where the data
  is, write RUN/value.json.
"""
