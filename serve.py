"""Serve a trained r1jax model over an OpenAI-compatible HTTP API:

    python serve.py [CONFIG] [checkpoint=PATH] [host=127.0.0.1] [port=8000] [api_key=KEY]
                    [slots=8] [max_len=N] [model_name=NAME] [tokenizer=FILE] [max_waiting=64]
                    [max_body_bytes=4194304] [shutdown_grace_s=30] [allow_unauthenticated=false]
                    [cors_origins=URL,URL] [log_requests=false] [key=value ...]

    python serve.py configs/tiny-pretrain.yaml checkpoint=runs/tiny-pretrain

checkpoint: a training run_dir (its newest readable checkpoint), a checkpoints dir, an exported
params dir (`python -m r1jax.interop.convert` writes one), or a Hugging Face model directory
(config.json + safetensors, e.g. DeepSeek-R1-Distill-Qwen-1.5B, read as it is); without it, the newest run under runs/ that has a params/ export (what
`make demo` writes). CONFIG defaults to the run's own config (saved with its checkpoints);
other `key=value` pairs override config fields, as in train.py (`model.expert_dtype=float8_e4m3fn`
keeps an FP8 checkpoint's routed experts in FP8). The tokenizer is the checkpoint's
(`tokenizer.json` or `tokenizer.model` in or next to it) unless `tokenizer=` names one.

Binds loopback unless `host=` says otherwise; with `api_key` set, requests need `Authorization:
Bearer KEY`, and a host other than loopback without one refuses to start unless
`allow_unauthenticated=true`. At most `slots + max_waiting` sequences are held; past that, 429
with Retry-After. SIGTERM / SIGINT: new requests get 503, those in flight finish within
`shutdown_grace_s`, then exit 0. No CORS headers unless `cors_origins` lists origins; prompts
are logged only with `log_requests=true`. Exits 2 on a config error, naming the key.
"""

import logging
import sys
from pathlib import Path

from r1jax import config as config_lib

SERVE_KEYS = {"checkpoint": str, "host": str, "port": int, "api_key": str, "slots": int, "max_len": int,
              "model_name": str, "tokenizer": str, "max_waiting": int, "max_body_bytes": int,
              "shutdown_grace_s": float, "allow_unauthenticated": bool, "cors_origins": str, "log_requests": bool}


def parse(argv: list[str]) -> tuple[str | None, dict, list[str]]:
    """(config path or None, serve options, config overrides)."""
    positionals, serve, overrides = config_lib.parse_options(argv, SERVE_KEYS, positional=("[CONFIG]",))
    config_lib.require_positive(serve, "port", "slots", "max_len", "max_body_bytes")
    if serve.get("max_waiting", 0) < 0:
        raise config_lib.ConfigError("max_waiting", f"must be >= 0, got {serve['max_waiting']}")
    if serve.get("shutdown_grace_s", 0) < 0:
        raise config_lib.ConfigError("shutdown_grace_s", f"must be >= 0, got {serve['shutdown_grace_s']}")
    from r1jax.serving.server import ExposureError, check_exposure

    try:
        check_exposure(serve.get("host", "127.0.0.1"), serve.get("api_key"), serve.get("allow_unauthenticated", False))
    except ExposureError as e:
        raise config_lib.ConfigError("host", str(e)) from None
    return (positionals[0] if positionals else None), serve, overrides


def newest_run(root: Path = Path("runs")) -> Path | None:
    runs = [d for d in root.glob("*") if (d / "params").is_dir()] if root.is_dir() else []
    return max(runs, key=lambda d: (d / "params").stat().st_mtime, default=None)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        path, serve, overrides = parse(argv)
        cfg = config_lib.load(path, *overrides) if path else None  # a bad override fails before any loading
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    checkpoint = serve.get("checkpoint") or newest_run()
    if checkpoint is None:
        print("no checkpoint: pass checkpoint=RUN_DIR (or exported params), or run `make demo` first to "
              "train one under runs/", file=sys.stderr)
        return 1
    checkpoint = Path(checkpoint)

    from r1jax import checkpoint as ckpt_lib
    from r1jax.data.tokenizer import find_tokenizer

    try:
        meta = ckpt_lib.read_meta(checkpoint)
    except (FileNotFoundError, OSError) as e:
        print(f"checkpoint: {e}", file=sys.stderr)
        return 1
    try:
        if cfg is None:
            if "config" not in meta:
                raise config_lib.ConfigError("", f"{checkpoint} has no saved config: pass CONFIG")
            cfg = config_lib.build(config_lib.Config, config_lib.merge(meta["config"], config_lib.load_dict(None, *overrides)))
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    candidates = [serve.get("tokenizer"), meta.get("tokenizer"), checkpoint, checkpoint.parent, cfg.data.tokenizer]
    tokenizer = find_tokenizer(candidates)
    if tokenizer is None:
        print(f"tokenizer: none found next to {checkpoint}; pass tokenizer=FILE (.model, tokenizer.json or "
              "a directory)", file=sys.stderr)
        return 1

    import uvicorn

    from r1jax.model.decoder import abstract_decoder
    from r1jax.sampling.engine import Engine, Weights
    from r1jax.serving.app import create_app

    graphdef, abstract_params, abstract_extra = abstract_decoder(cfg.model)
    try:
        params, extra = ckpt_lib.load_params(checkpoint, (abstract_params, abstract_extra))
    except (ValueError, RuntimeError) as e:  # a CheckpointError names the file or tensor
        print(f"checkpoint: {e}", file=sys.stderr)
        return 1
    max_len = serve.get("max_len", min(cfg.model.max_position_embeddings, 4096))
    engine = Engine(Weights(graphdef, params, extra), slots=serve.get("slots", 8), max_len=max_len)
    name = serve.get("model_name", checkpoint.resolve().name if checkpoint.name != "params" else
                     checkpoint.resolve().parent.name)
    from r1jax.serving.server import GracefulServer

    cors = tuple(o.strip() for o in serve.get("cors_origins", "").split(",") if o.strip())
    app = create_app(engine, tokenizer, model_name=name, api_key=serve.get("api_key"),
                     max_waiting=serve.get("max_waiting", 64), max_body_bytes=serve.get("max_body_bytes", 4 << 20),
                     cors_origins=cors, log_requests=serve.get("log_requests", False))
    host, port = serve.get("host", "127.0.0.1"), serve.get("port", 8000)
    print(f"serving {name} from {checkpoint} at http://{host}:{port}/v1 ({engine.slots} slots, max_len {max_len}, "
          f"max_waiting {app.state.admission.max_waiting})", flush=True)
    server = GracefulServer(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5),
                            app.state.admission, grace_s=serve.get("shutdown_grace_s", 30.0))
    server.run()
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
