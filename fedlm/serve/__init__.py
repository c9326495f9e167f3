"""Serving: an OpenAI-compatible HTTP API over a trained fedlm model (`fedlm serve`).

    from fedlm.serve.app import create_app, serve_forever

app.py: the HTTP layer (routes, limits); guard.py: what each request passes first (API key,
a slot, the body's size and time limits) and its line in /metrics; engine.py: the batched decoder;
responses.py: errors, JSON answers and server-sent events; schemas.py: request and response
bodies; text.py: chat templates and streamed detokenization; metrics.py: /metrics.
"""
