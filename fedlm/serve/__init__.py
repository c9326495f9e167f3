"""Serving: an OpenAI-compatible HTTP API over a trained fedlm model (`fedlm serve`).

    from fedlm.serve.app import create_app, serve_forever

app.py holds the HTTP layer, engine.py the batched decoder, schemas.py the request and
response bodies, text.py chat templates and streamed detokenization, metrics.py /metrics.
"""
