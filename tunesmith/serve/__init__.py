"""Serving: the generation engine (`engine.Engine`, shared with eval), the OpenAI-compatible API
(`api.create_app`) and the browser chat page (`web.build_demo`). fastapi / uvicorn / gradio are imported only
by the modules that need them (`pip install 'tunesmith[serve]'`)."""
