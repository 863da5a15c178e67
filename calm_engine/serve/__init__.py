"""`calm serve`: an OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn; `pip install -e '.[serve]'`).

config.py ServeConfig · protocol.py request schema and response shapes · errors.py OpenAI-shaped errors ·
engine_loop.py the thread that owns the engine · text_stream.py incremental detokenization · completions.py
/v1/completions · metrics.py Prometheus · auth.py API keys · app.py routes · server.py load, warm up, run, shut down.
"""
