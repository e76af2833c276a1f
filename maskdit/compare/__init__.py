"""`maskdit compare`: MaskDiT against the same network trained unmasked, at equal wall-clock time.

Two arms train on the same data for the same training time on the same machine:
- maskdit: masked pretraining (the `pretrain` config: mask 0.5 + MAE) for (1 - tune_share) of the
  budget, then the unmasking tuning (the `tune` config: zero or cosine ratio) for the rest;
- dit: the `pretrain` config with mask.ratio 0 and mae_weight 0 - the same network, decoder
  included, so parameters and FLOPs a token are the paper's comparison.

Every `budget_s / eval_points` seconds of training, both arms are scored: FID of `fid_samples`
images (fixed labels i mod K and seeds seed + i, so both arms draw the same noise) against
held-out real data, and the accuracy of a digit classifier (maskdit.evaluation.classifier) trained on the
training data. Evaluation time does not count: training runs in segments of `maskdit train`
itself (`train.run` with `max_wall_s`, resuming from the arm's checkpoint), and the clock is the
sum of the segments' loop times (TrainResult.seconds). The arms alternate segment by segment
(which goes first alternates too), so a change in machine load hits both alike: the machine this
runs on may be shared. Segment start-up (building the model, loading the checkpoint) is not
counted either; it is the same for both arms.

Output in `out`: compare.json (both curves), compare.png (FID against wall clock and against
images seen, accuracy against wall clock), a sample grid per arm and point, and the arms'
checkpoint folders. With MLflow: one parent run (params, the plot, compare.json, FID of both arms
as `<arm>_fid`), two child runs (`maskdit`, `dit`: the training metrics, and `fid`, `accuracy`,
`images_seen` at step = seconds of training); the tuning phase is a run under `maskdit`.

Modules: `config` (CompareConfig in, CompareResult out), `arms` (the arms and their segments),
`judge` (FID and accuracy of an arm), `plot` (compare.png), `tracker` (the MLflow parent run),
`command` (`run`: the whole comparison), `report` (`maskdit compare-report`: several seeds of one
comparison as bands, a table and first-reach times).
"""
