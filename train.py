"""Train r1jax models: `python train.py CONFIG [key=value ...]`.

    python train.py configs/tiny-pretrain.yaml steps=200 run_dir=runs/pre
    python train.py configs/tiny-sft.yaml init_from=runs/pre run_dir=runs/sft
"""

import logging
import sys

from r1jax import config as config_lib
from r1jax.data.sources import DataError


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every save at INFO
    try:
        (path,), _, overrides = config_lib.parse_options(argv, positional=("CONFIG",))
        cfg = config_lib.load(path, *overrides)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("r1jax").setLevel(logging.INFO)
    # jax and Orbax load here, once the config reads.
    from r1jax.checkpoint import CheckpointError

    try:
        return run(cfg)
    except config_lib.ConfigError as e:  # e.g. a data path that does not exist
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # a malformed record (data.skip_bad_lines: true skips them)
        print(f"data error: {e}", file=sys.stderr)
        return 1
    except FloatingPointError as e:  # max_nonfinite_steps NaN/inf losses in a row
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:  # a save failed on disk (full, quota): the newest finished checkpoint stands
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 1


def run(cfg: config_lib.Config) -> int:
    if cfg.mode == "grpo":
        from r1jax.train.grpo import GrpoTrainer, NoSignalError

        try:
            result = GrpoTrainer(cfg).train()
        except NoSignalError as e:  # grpo.max_iterations_without_signal iterations of all-alike groups
            print(f"training stopped: {e}", file=sys.stderr)
            return 1
        if result["stopped_at"] is not None:
            print(f"\ngrpo stopped after iteration {result['stopped_at']} on a signal, checkpointed: the same command "
                  "resumes it")
            return 0
        print("\ngrpo finished")
        for name in ("first_eval", "final_eval"):
            if result[name]:
                print(f"  {name:<12}" + "  ".join(f"{k} {v:.3f}" for k, v in result[name].items()))
        print(f"  rollout {result['rollout_s']:.0f} s, update {result['update_s']:.0f} s, "
              f"rollout {result['rollout_tokens_per_s']:,.0f} tokens/s, curves {result['plot']}")
        return 0
    if cfg.mode == "distill":
        from r1jax.train.distill import distill

        summary = distill(cfg)
        print("\ndistill finished")
        print(summary.table())
        return 0
    from r1jax.train.loop import train

    summary = train(cfg)
    print(f"\n{cfg.mode} finished")
    print(summary.table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
