"""The registered model served by `mlflow models serve`, under load, from a fresh store: a phantom model trained
through a local `mlflow server` (register=true, alias=champion), served from models:/<name>@champion on 127.0.0.1, then
40 requests, 4 at a time, each answer compared voxel for voxel with pipeline.infer's label map of the same volume;
p50 / p95 latency and throughput into docs/results/serve.md, with a headless Chromium screenshot of the run's page in
the MLflow UI (docs/results/mlflow_ui.png).

    .venv/bin/python bench/serve.py [--requests 40] [--concurrency 4] [--epochs 3]
"""

import argparse
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np

from pipeline.core.config import compose
from pipeline.data.phantom import synthesize
from pipeline.inference.predictor import infer
from pipeline.inference.serving import INPUT, OUTPUT, encode
from pipeline.tracking.runs import TRAINING_VIEW
from pipeline.training.run import train

from common import RESULTS, machine, machine_line, write

MLFLOW = Path(sys.executable).parent / "mlflow"
NAME = "phantom-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], ping: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """A server process (its own session, so that its workers go with it), once `ping` answers 200."""
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                               env=os.environ | (env or {}))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(ping, timeout=2) as r:
                if r.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{' '.join(command[:3])}: not up at {ping}:\n{log.read_text()[-2000:]}")


def request(url: str, body: bytes) -> tuple[float, bytes]:
    """One POST: its latency in seconds and the label map's bytes."""
    began = time.perf_counter()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as err:  # the server's own message, not urllib's
        raise SystemExit(f"{url}: HTTP {err.code}: {err.read().decode()[-1000:]}") from None
    return time.perf_counter() - began, base64.b64decode(answer["predictions"][0][OUTPUT])


def screenshot(ui: str, run, target: Path) -> str | None:
    """The run's page in the MLflow UI (its Dice, datasets and model) as a PNG (headless Chromium), or why not."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return "no chromium on this machine"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=20000", "--window-size=1400,1700", f"--screenshot={target}",
                           f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}{TRAINING_VIEW}"],
                          capture_output=True, text=True, timeout=180)
    return None if done.returncode == 0 and target.is_file() else done.stderr[-300:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3, help="the phantom model's training (its speed, not Dice)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    processes = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        try:
            port = free_port()
            tracking = f"http://127.0.0.1:{port}"
            processes.append(start([str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                                    "--serve-artifacts", "--artifacts-destination", str(tmp / "mlartifacts"),
                                    "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                   f"{tracking}/health", tmp / "server.log",
                                   {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}))
            os.environ["MLFLOW_TRACKING_URI"] = tracking
            data = synthesize(tmp / "phantom", num_cases=8, seed=0)
            result = train(compose("train", [f"data.root={data}", f"trainer.max_epochs={args.epochs}",
                                             f"tracking.uri={tracking}", "tracking.register=true",
                                             f"tracking.model_name={NAME}", "tracking.alias=champion",
                                             f"paths.run_dir={tmp / 'run'}", f"paths.outputs={tmp / 'outputs'}"]))
            volumes = sorted((data / "imagesTr").iterdir())[:4]
            shape = "x".join(map(str, nib.load(volumes[0]).shape))
            expected = {}
            for v in volumes:  # pipeline.infer's label map of each volume, from the same registered model
                (written,) = infer(f"models:/{NAME}@champion", v, tmp / "infer", overwrite=True)["written"]
                expected[v] = np.asarray(nib.load(written).dataobj)
            serve_port = free_port()
            began = time.perf_counter()
            processes.append(start([str(MLFLOW), "models", "serve", "-m", f"models:/{NAME}@champion",
                                    "--env-manager", "local", "--host", "127.0.0.1", "--port", str(serve_port),
                                    "--workers", "1"], f"http://127.0.0.1:{serve_port}/ping", tmp / "serve.log",
                                   {"PATH": f"{MLFLOW.parent}:{os.environ['PATH']}"}))  # its uvicorn
            startup = time.perf_counter() - began
            bodies = {v: json.dumps({"dataframe_split": {"columns": [INPUT], "data": [[encode(v)]]}}).encode()
                      for v in volumes}
            order = [volumes[i % len(volumes)] for i in range(args.requests)]
            url = f"http://127.0.0.1:{serve_port}/invocations"
            request(url, bodies[order[0]])  # one warm-up: the model's first call builds its backend
            began = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                answers = list(pool.map(lambda v: request(url, bodies[v]), order))
            wall = time.perf_counter() - began
            equal = 0
            for v, (_, label_bytes) in zip(order, answers):
                (tmp / "answer.nii.gz").write_bytes(label_bytes)
                equal += np.array_equal(np.asarray(nib.load(tmp / "answer.nii.gz").dataobj), expected[v])
            latencies = sorted(s for s, _ in answers)
            shot = args.results / "mlflow_ui.png"
            args.results.mkdir(parents=True, exist_ok=True)
            failed = screenshot(tracking, mlflow.MlflowClient(tracking).get_run(result["run_id"]), shot)
        finally:
            for p in reversed(processes):
                os.killpg(p.pid, 9)
                p.wait(timeout=30)
    figures = {"requests": args.requests, "concurrency": args.concurrency, "volume": shape,
               "equal_to_infer": equal, "p50_s": round(statistics.median(latencies), 3),
               "p95_s": round(latencies[max(0, int(np.ceil(0.95 * len(latencies))) - 1)], 3),
               "max_s": round(latencies[-1], 3), "requests_per_s": round(args.requests / wall, 2),
               "startup_s": round(startup, 1), "screenshot": None if failed else shot.name, "machine": machine()}
    write("serve", figures, page(figures, failed), args.results)
    print(json.dumps({k: v for k, v in figures.items() if k != "machine"}))
    if equal != args.requests:
        raise SystemExit(f"{args.requests - equal} of {args.requests} answers differ from pipeline.infer's")


def page(f: dict, failed: str | None) -> str:
    lines = ["# Serving: `mlflow models serve` under load", "",
             "Written by `bench/serve.py` (do not edit by hand): a phantom model trained through a local `mlflow "
             "server`, registered with the alias `champion`, served by `mlflow models serve -m "
             "models:/phantom-bench@champion --env-manager local` (one worker, 127.0.0.1); each answer compared voxel "
             "for voxel with `pipeline.infer`'s label map of the same volume. Latency is the client's, request to "
             "answer, with the requests in flight at once queueing at the one worker.", "",
             machine_line(f["machine"]), "",
             "| requests | at once | volume | equal to pipeline.infer | p50 s | p95 s | max s | requests/s | "
             "server start s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| {f['requests']} | {f['concurrency']} | {f['volume']} | {f['equal_to_infer']} of {f['requests']} | "
             f"{f['p50_s']} | {f['p95_s']} | {f['max_s']} | {f['requests_per_s']} | {f['startup_s']} |", ""]
    if f["screenshot"]:
        lines += ["The run's page in the MLflow UI (`make mlflow-ui`): its metrics (the Dice), datasets and logged "
                  "model, as headless Chromium renders it:", "", f"![The run in the MLflow UI]({f['screenshot']})", ""]
    else:
        lines += [f"No screenshot: {failed}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
