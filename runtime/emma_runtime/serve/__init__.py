"""`emma-run serve`: EMMA's three tasks behind OpenAI's HTTP API, batched across requests.

scheduler.py owns the pipeline on one engine thread and batches concurrent requests step by step;
inputs.py turns HTTP requests into checked jobs; app.py is the FastAPI app; ray_deploy.py runs the
same app as a Ray Serve deployment. Nothing here imports torch; FastAPI, uvicorn and Ray are
imported only by the command that needs them.
"""
