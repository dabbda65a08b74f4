"""An OpenAI-compatible HTTP server over the sampling engine: `app` (FastAPI endpoints),
`worker` (the engine thread), `protocol` (request / response models), `reasoning` (the
`<think>` splitter). Started by `serve.py` at the repo root."""
