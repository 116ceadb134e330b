"""Training: `canon.engine.trainer.train(recipe, output_dir)` runs a recipe end to end.

Modules: trainer (the loop), setup (building a run: data, model placement, restore),
optimization (loss, SGD's parameter groups, weight averaging), schedules (learning rates),
precision (autocast, loss scaling), checkpoint (atomic save, resume, export), logs
(metrics.csv, curves.png, progress), distributed (torchrun / DDP edge), model_parallel
(AlexNet's towers, stages:K pipelines). Import the submodule you need; this
package imports nothing so that `canon.engine.distributed` stays importable on its own.
"""
