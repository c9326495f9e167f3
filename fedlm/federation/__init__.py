"""Federation: training across silos on Flower, in one process or on Flower's deployment engine.

Top to bottom, each module owns one part:

- `runner`: the entry point (`run_federated`): resolve the config, prepare the run directory,
  pick the engine.
- `rundir`: the run directory (config.toml, the round checkpoint, summary.json); no Flower.
- `rounds`: the server's rounds loop over a Flower Grid, the ServerApp's body on both engines.
- `exchanges`: one round's exchange with the sampled silos (plain, cyclic, secure
  aggregation), returning a `RoundResult`.
- `messages`: the Flower records both sides read and write.
- `task`: a silo's own work and the model facts both sides share; no Flower.
- `client_app`, `server_app`: the thin Flower apps; `grid`: the in-process Grid; `deploy`:
  SuperLink and SuperNode processes.
- On the deployment engine: `replies` (the ServerApp's bounded waits), `packing` (a message's
  arrays as one object), `polls` (Flower's fixed waits shortened), `supernode` and `warm_exec`
  (a silo's SuperNode and its client launcher), `hops` (timestamps per hop, for the bench).
- The mechanisms, plain functions over tensors: `strategies` (server optimisers, sampling),
  `robust`, `codecs`, `secagg` (on Flower's crypto primitives only), `dp_rounds`.
"""
