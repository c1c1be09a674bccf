"""Peer: FastAPI + uvicorn + ONNX Runtime, a thread pool, no batching (the simplest thing)."""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, File, UploadFile
from starlette.concurrency import run_in_threadpool

from common import PeerModel

app = FastAPI()
model = PeerModel()


@app.post("/predict")
async def predict(files: list[UploadFile] = File(...)) -> dict[str, float]:  # noqa: B008
    data = await files[0].read()
    return await run_in_threadpool(model.screen, data)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
