"""The edge: the HTTP API and the SSE streams (Starlette on uvicorn), one Redis subscription
per generation fanned out to its viewers. Imports ``broker.core`` only."""
