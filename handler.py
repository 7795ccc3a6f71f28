"""RunPod's entry point: `python handler.py` is `python app.py --mode runpod`.

The RunPod Hub looks for a handler.py; the worker it starts is app.py's own (its init loads the model, its handler
runs a request), made a `runpod.serverless` worker by sdworker/platforms/runpod.py. RunPod's flags pass through:
`python handler.py --test_input '{"input": {"prompt": "a lighthouse"}}'`, `--rp_serve_api`. Importing this file
starts nothing. The Docker image runs app.py, which is a RunPod worker by itself on RunPod serverless (RunPod
sets RUNPOD_ENDPOINT_ID there), or with MODE=runpod (.runpod/hub.json sets it too).
"""

import sys

from app import app
from sdworker.platforms import run

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Start app.py's app as a RunPod serverless worker, whatever MODE says."""
    run(app, [*(sys.argv[1:] if argv is None else argv), "--mode", "runpod"])


if __name__ == "__main__":
    main()
