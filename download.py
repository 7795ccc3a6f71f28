"""Bake MODEL_ID's weights into MODEL_DIR at build time, with the same loader app.py uses at start.

    python download.py                       # MODEL_ID etc. from the environment, else build_args.env
    python download.py --model-id tiny-sd    # flags override both
    python download.py --refiner-id stabilityai/stable-diffusion-xl-refiner-1.0   # add a refiner, keep the base

Exit status 0 when the model is baked (or already was), 1 with one line on stderr when it cannot be, 2 when
a setting is wrong.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from sdworker.config import Settings
from sdworker.errors import WorkerError

if TYPE_CHECKING:
    from sdworker.model import BakeResult


def main(argv: list[str] | None = None) -> int:
    """Parse flags, bake, and print what was baked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model-id", help="hub id, local directory, s3://bucket/prefix, a checkpoint file or URL, or a tiny recipe"
    )
    parser.add_argument("--model-config", help="a checkpoint file's family configuration (MODEL_CONFIG)")
    parser.add_argument("--refiner-id", help="an SDXL refiner to bake beside the base (REFINER_ID)")
    parser.add_argument("--loras", help="LoRAs to bake beside the model: name=source,... (LORAS)")
    parser.add_argument("--embeddings", help="textual-inversion embeddings to bake: name=source,... (EMBEDDINGS)")
    parser.add_argument("--revision", help="hub branch, tag or commit")
    parser.add_argument("--variant", help="weight variant such as fp16")
    parser.add_argument("--model-dir", help="where to write the pipeline")
    parser.add_argument("--force", action="store_true", help="bake again even if MODEL_DIR holds this model")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the result to check it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = {
        "model_id": args.model_id,
        "model_revision": args.revision,
        "model_variant": args.variant,
        "model_dir": args.model_dir,
        "refiner_id": args.refiner_id,
        "model_config_id": args.model_config,
        "loras": args.loras,
        "embeddings": args.embeddings,
    }
    try:
        settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    except WorkerError as err:
        print(f"download.py: {err.message}", file=sys.stderr)
        return 2
    from sdworker.model.bake import nothing_to_bake  # sdworker.model imports torch only once it loads or bakes

    if not args.force and nothing_to_bake(settings):
        print(f"{settings.model_id} is already baked in {settings.model_dir}; nothing to do")
        return 0
    # torch and diffusers only now: a wrong setting, or a model already baked, is said in a fraction of a second.
    from diffusers.utils import logging as diffusers_logging  # after sdworker, which quiets what they log
    from huggingface_hub.utils import logging as hf_logging
    from transformers.utils import logging as transformers_logging

    from sdworker.model import bake_model, family_of
    from sdworker.model.bake import bake_named, parse_named_sources

    # The libraries' warnings would bury the one line that says what happened; the hub's download bars stay.
    hf_logging.set_verbosity_error()
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    bakes = [(settings.model_id, settings.model_dir, settings.model_revision, False)]
    if settings.refiner_id:  # beside the base, which is baked first (or kept, when it already is)
        bakes.append((settings.refiner_id, settings.model_dir / "refiner", None, True))
    for model_id, model_dir, revision, refiner in bakes:
        try:
            if refiner and not family_of(settings.model_dir).refiner:
                raise WorkerError("NO_REFINER", f"the {family_of(settings.model_dir).name} family has no refiner")
            result = bake_model(
                model_id,
                model_dir,
                revision=revision,
                variant=settings.model_variant,
                token=token,
                force=args.force,
                verify=not args.no_verify,
                refiner=refiner,
                config=settings.model_config_id,
                sha256=settings.model_sha256,
                allow_pickle=settings.allow_pickle,
                dtype=settings.bake_dtype,
            )
        except WorkerError as err:
            print(f"download.py: cannot bake {model_id}: {err.message}", file=sys.stderr)
            return 1
        except Exception as err:  # anything else still ends in one line, not a traceback
            print(f"download.py: cannot bake {model_id}: {err.__class__.__name__}: {err}", file=sys.stderr)
            return 1
        report(result, token)
    for kind, value in (("loras", settings.loras), ("embeddings", settings.embeddings)):
        try:
            named = parse_named_sources(value, kind.upper())
            added = bake_named(settings.model_dir, kind, named, token, not args.no_verify) if named else []
        except WorkerError as err:
            print(f"download.py: cannot bake the {kind}: {err.message}", file=sys.stderr)
            return 1
        if added:
            print(f"baked {kind} {', '.join(added)} into {settings.model_dir / kind}")
    return 0


def report(result: BakeResult, token: str | None) -> None:
    """One line saying what was baked, or that it already was."""
    manifest = result.manifest
    if result.skipped:
        print(f"{manifest['model_id']} is already baked in {result.model_dir}; nothing to do")
        return
    print(
        f"baked {manifest['model_id']} (revision {manifest['revision'] or 'default'}, "
        f"weights variant {manifest['weights_variant'] or 'none'}) from {manifest['source']} "
        f"into {result.model_dir}: "
        f"{manifest['files']} files, {manifest['bytes'] / 2**20:.1f} MiB in {result.seconds:.1f} s; "
        f"HF_TOKEN {'given' if token else 'not set'}"
    )


if __name__ == "__main__":
    sys.exit(main())
