"""Training: `state` and `step` (AdamW state, the compiled train step and its update), `losses`,
`loop` (train.py's pretrain / SFT loop and the end of a run), `grpo` with `policy_loss`,
`advantages` and `rewards` (GRPO and its variants, verifiable rewards), `rejection` (rejection
sampling into SFT data), `evaluate` (task pass@1), `metrics` (logs, curves, MFU) and `dryrun`."""
