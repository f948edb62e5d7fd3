"""The `verl` training backend: a train request as a verl 0.9.1 GRPO run in subprocesses (GPU clusters).

One request becomes
1. the selected problems as a parquet file in verl's RL dataset format (dataset),
2. `python3 -m verl.trainer.main_ppo <hydra overrides>`, then `python3 -m verl.model_merger
   merge ...`, which writes a Hugging Face directory that rollout and scoring load (command),
laid out as a VerlJob in a scratch directory (job). The trainer command runs through a
launcher (launcher): `local`, a subprocess that a cancel, a deadline or a killed trainer ends
(process), or `ray`, the same command as a job on a Ray cluster through Ray's Job Submission
API (ray_launcher, ray_submission, ray_logs), for training on several nodes; its console
metrics are read as our StepMetrics (metrics) and the model merger follows here (run).
VerlBackend (backend) is what the trainer service calls; options holds the cluster-side
settings, checks what is refused up front.

Nothing here imports verl, so the package runs (and is tested) without verl installed.
Not supported by this backend (refused up front): sampling stop strings (verl's rollout
config has none) and exporting the optimizer state; rollout reuse is ignored (verl
samples every step itself).
"""
