"""Federation: strategies and server optimisers, robust aggregation, secure aggregation, and the Flower apps."""
