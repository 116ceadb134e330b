"""Setting a training run up: `set_up` builds the `Run` the loop in canon.engine.trainer
runs (datasets, loaders, model on its devices, optimizer, weight averaging, lr schedule with
iteration counts converted to the global batch, and the state a resumed run continues from),
and `open_run_dir` writes the run directory's recipe.yaml and states the run's plan."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import Dataset

import canon
from canon.data.batched import BatchedCrop, DeviceBatches, held_images
from canon.data.datasets import (
    check_dataset_name,
    check_recorded_dataset,
    validates_on_test_split,
)
from canon.data.device_jpeg import DeviceCrops, DeviceDecodedBatches, FileBytes, collate_files
from canon.data.folders import FolderImages
from canon.data.loaders import Datasets, build_datasets, build_loader
from canon.data.sampling import SeededOrder, SeededSamples, eval_shard, spread_seed
from canon.data.shards import ShardImages
from canon.engine import checkpoint as ckpt
from canon.engine import distributed as dist
from canon.engine.freezing import check_frozen_stages
from canon.engine.graphed import GraphedStep
from canon.engine.initialize import InitReport, initialize_from
from canon.engine.logs import check_tensorboard, event_writer
from canon.engine.model_parallel import parallelize
from canon.engine.optimization import make_average, make_optimizer
from canon.engine.precision import Precision
from canon.engine.schedules import LearningRateSchedule, scale_iteration_counts
from canon.engine.stopping import loader_worker_init
from canon.engine.trained import TORCHVISION
from canon.errors import ConfigError, first_line
from canon.files import atomic_write
from canon.models.base import MODELS, check_num_classes
from canon.models.factory import ModelOptionError, create_model
from canon.recipes import RECIPE_HEADER, dump_yaml, flat_values
from canon.recipes.schema import Recipe, ScheduleSection, TrainSection


class _WithAux(nn.Module):
    """Makes `forward_with_aux` the module's forward, so DDP and torch.compile see it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.model.forward_with_aux(images)


def new_totals() -> dict[str, Any]:
    """The running sums of an epoch on this rank (all-reduced when it ends), and the correct
    predictions and images counted up to the last loss check (a warm-up that ends on the
    training error reads the steps since then)."""
    return {"loss": 0.0, "correct": 0.0, "images": 0, "skipped": 0, "seconds": 0.0,
            "checked_correct": 0.0, "checked_images": 0}


@dataclass(eq=False)
class Run:
    """One training run: what `set_up` builds and the loop in canon.engine.trainer runs."""

    recipe: Recipe
    ctx: dist.DistributedContext
    run_dir: Path
    train_size: int
    classes: list[str]  # human names
    class_ids: list[str]  # the dataset's own labels (folder names, e.g. wnids)
    num_classes: int
    normalization: dict[str, torch.Tensor | None] | None
    # What the training loader reads, set before each epoch by set_epoch(epoch, start): the
    # keys of this rank's sample order, or a shard folder's stream itself.
    train_order: SeededOrder | ShardImages
    train_loader: Any
    val_loader: Any
    model: nn.Module  # the plain model, whose state dict the checkpoints hold
    train_module: nn.Module  # the model as trained: in DDP and torch.compile wrappers
    average: AveragedModel | None  # train.ema_decay or train.polyak_after_epochs
    optimizer: torch.optim.Optimizer
    schedule: LearningRateSchedule
    precision: Precision
    criterion: nn.Module
    steps_per_epoch: int
    total_steps: int
    commit: str | None
    epochs: int = 0  # epochs this run reaches (an iteration limit may end it early)
    epoch: int = 0  # epochs finished (not one the iteration limit cut short)
    step: int = 0  # optimizer steps taken
    step_in_epoch: int = 0
    epoch_started: float = 0.0  # time.perf_counter() when this epoch's training started
    metrics: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=new_totals)
    best_error: float = math.inf
    # The validation set is the test set: no checkpoint is chosen on it (no best.pt).
    validates_on_test_set: bool = False
    events: Any = None  # TensorBoard writer (rank 0, train.tensorboard)
    val_size: int = 0
    iterations: int | None = None  # train.iterations converted to this run's global batch
    init_report: InitReport | None = None  # what model.init_from copied
    frozen: list[nn.Parameter] = field(default_factory=list)  # this epoch's frozen stages
    graphed_step: GraphedStep | None = None  # train.cuda_graph
    cut_short: bool = False  # the iteration limit ended the run inside an epoch
    resumed_from: Path | None = None  # the checkpoint this run went on from
    # The recipe values a resume changed, "key: before -> now" (recipe.yaml keeps them).
    changed_on_resume: list[str] = field(default_factory=list)


def set_up(
    recipe: Recipe,
    run_dir: Path,
    ctx: dist.DistributedContext,
    model: nn.Module | None,
    datasets: Datasets | None,
    state: dict[str, Any] | None,
) -> Run:
    config = recipe.train
    sets = datasets or _build_datasets(recipe, ctx, state)
    train_set, val_set = (_for_this_rank(s, config, ctx) for s in (sets.train, sets.val))
    preprocess = sets.preprocess
    classes = [str(c) for c in getattr(train_set, "classes", [])]
    class_ids = [str(c) for c in getattr(train_set, "class_ids", classes)]
    num_classes = recipe.model.num_classes or len(classes)
    if classes and num_classes != len(classes):  # labels past the head, or outputs never named
        raise ConfigError(
            f"model.num_classes is {num_classes}, but the training set has {len(classes)} "
            f"classes ({recipe.data.dataset}): drop model.num_classes (it defaults to the "
            "dataset's count), or train on a dataset of that many classes")
    if not num_classes:
        raise ConfigError("the training set has no .classes: set model.num_classes")
    if num_classes < 2:
        raise ConfigError(
            f"the training set has {num_classes} class ({', '.join(classes) or 'unnamed'}): "
            "classification needs at least two"
        )
    normalization = {
        "mean": preprocess.normalize.mean, "std": preprocess.normalize.std,
    } if preprocess is not None else None
    # This rank's samples per epoch: a stream's length is its share already.
    rank_samples = (len(train_set) if isinstance(train_set, ShardImages)
                    else len(train_set) // ctx.world_size)
    steps_per_epoch = rank_samples // config.batch_size // config.accum_steps
    if isinstance(train_set, ShardImages):  # its share depends on this rank's loader workers,
        # which each machine sets for its own cores: a rank stepping on alone would hang
        steps_per_epoch = min(dist.all_gather_object(steps_per_epoch, ctx))
    if steps_per_epoch == 0:
        stream = (f" (a shard folder: each rank streams whole shards, here {rank_samples} "
                  f"images at the least of {len(train_set.shards)} shards over "
                  f"{ctx.world_size} rank(s) and {max(train_set.workers, 1)} loader "
                  "worker(s); re-pack into more shards with canon pack --shard-size)"
                  if isinstance(train_set, ShardImages) else "")
        raise ConfigError(
            f"{len(sets.train)} training images make no full step of batch {config.batch_size} "
            f"x accum {config.accum_steps} x {ctx.world_size} device(s){stream}; give it more "
            "images, or a smaller train.batch_size (--batch-size)"
        )
    if config.cuda_graph and (ctx.world_size > 1 or recipe.model.frozen_stages):
        raise ConfigError(
            "train.cuda_graph captures one process's plain step: run it without torchrun and "
            "without model.frozen_stages"
        )
    global_batch_size = config.batch_size * config.accum_steps * ctx.world_size
    schedule_config, iterations = scale_iteration_counts(
        recipe.schedule, config.iterations, recipe.optimizer.base_batch_size, global_batch_size
    )
    # An iteration limit is the run's length (ResNet s4.2's 64k), however many epochs of this
    # split, batch and world size that takes.
    total_steps = config.epochs * steps_per_epoch if iterations is None else iterations

    train_order, train_loader, val_loader = _loaders(train_set, val_set, config, ctx)
    model, init_report = _placed_model(
        recipe, model, num_classes, class_ids, ctx, fresh=state is None
    )
    optimizer, peak_lr = make_optimizer(model, recipe.optimizer, global_batch_size,
                                        recipe.model.frozen_stages)
    train_module: nn.Module = dist.wrap_model(
        _WithAux(model), ctx, sync_batchnorm=config.sync_batchnorm
    )
    if config.compile:
        train_module = torch.compile(train_module)
    run = Run(
        recipe=recipe, ctx=ctx, run_dir=run_dir, train_size=len(sets.train), classes=classes,
        class_ids=class_ids, num_classes=num_classes, normalization=normalization,
        train_order=train_order, train_loader=train_loader, val_loader=val_loader, model=model,
        train_module=train_module, average=make_average(model, config), optimizer=optimizer,
        schedule=LearningRateSchedule(
            optimizer, schedule_config, peak_lr=peak_lr, base_lr=recipe.optimizer.lr,
            steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        ),
        precision=Precision(config.amp, ctx.device, cache=not config.cuda_graph),
        criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, commit=ckpt.git_commit(),
        val_size=len(sets.val), iterations=iterations,
        validates_on_test_set=validates_on_test_split(recipe.data), init_report=init_report,
        resumed_from=Path(state[ckpt.RESUMED_FROM]) if ckpt.RESUMED_FROM in (state or {}) else None,
    )
    if state is not None:
        _restore(run, state)
        run.changed_on_resume = recipe_changes(state["recipe"], recipe.to_dict())
        if run.step > total_steps:  # it would export a model its recipe.yaml does not describe
            raise ConfigError(
                f"the run has trained {run.step} steps ({run.epoch} epoch(s) + "
                f"{run.step_in_epoch} steps), more than the {total_steps} its recipe now asks "
                "for: a resumed run cannot be shortened; ask for as many or more (--epochs, "
                "train.iterations), or evaluate it as it is (canon eval RUN)")
    else:
        torch.manual_seed(config.seed + ctx.rank)  # dropout differs between ranks
    # An iteration limit may end an epoch early; a resumed run with a higher limit goes on
    # with the rest of that epoch.
    steps_left = total_steps - run.step + run.step_in_epoch  # from the current epoch's start
    run.epochs = run.epoch + max(0, math.ceil(steps_left / steps_per_epoch))
    if iterations is None:
        run.epochs = min(config.epochs, run.epochs)
    run.best_error = min((row["val_top1_error"] for row in run.metrics), default=math.inf)
    if config.polyak_after_epochs is not None and config.polyak_after_epochs >= run.epochs:
        warnings.warn(f"train.polyak_after_epochs {config.polyak_after_epochs}: the run ends "
                      f"after {run.epochs} epoch(s), before averaging begins, so its raw "
                      "weights are validated and exported: lower it or lengthen the run",
                      stacklevel=3)
    return run


def _check_crop_fits(model: nn.Module, recipe: Recipe) -> None:
    """The training crop is an input the model takes (else the first step would say so, after
    a statistics pass over the whole training set)."""
    crop, smallest = recipe.data.crop_size, getattr(model, "min_input_size", 0)
    fixed = getattr(model, "fixed_input_size", None)
    if crop < smallest or fixed not in (None, crop):
        needs = f"{fixed} px" if fixed is not None else f"at least {smallest} px"
        raise ConfigError(
            f"data.crop_size {crop}: {recipe.model.name} takes inputs of {needs}; set "
            "data.crop_size (and data.resize_size, the side it is cut from) to fit")


def check_recipe(recipe: Recipe, *, model_given: bool, datasets_given: bool,
                 fresh: bool = True) -> None:
    """What can be checked before any data is read or any file written (model.init_from only
    for a `fresh` run: a resumed one has its own weights)."""
    if not model_given:
        MODELS.get(recipe.model.name)  # UnknownNameError listing close names
        section = recipe.model
        try:
            with torch.device("meta"):  # the builder takes the options? (no weights allocated)
                model = build_model(recipe, section.num_classes or 2)
        except (RuntimeError, NotImplementedError):  # a user's builder reading a weight's value
            model = None
        if model is not None:
            check_frozen_stages(model, section.frozen_stages)  # it has so many stages?
            if not datasets_given:  # given sets make their own inputs
                _check_crop_fits(model, recipe)
    if not datasets_given:
        check_dataset_name(recipe.data.dataset)
    workers, cores = recipe.train.workers, dist.cores_per_process()
    if workers is not None and workers > MAX_WORKERS_PER_CORE * cores:
        raise ConfigError(
            f"train.workers {workers}: this process has {cores} CPU core(s); more than "
            f"{MAX_WORKERS_PER_CORE} loader processes a core only compete for them and for "
            "memory. Leave it out (one per core, at most 8) or lower it"
        )
    source = recipe.model.init_from
    if (fresh and source is not None and not source.startswith(TORCHVISION)
            and not Path(source).exists()):
        raise ConfigError(
            f"model.init_from {source} does not exist: pass --init-from with the run directory "
            "or checkpoint to start from (a bundled recipe names the run it expects)"
        )
    fine_tuning = [key for key, asked in [
        ("model.frozen_stages", recipe.model.frozen_stages > 0),
        ("optimizer.backbone_lr_scale", recipe.optimizer.backbone_lr_scale != 1),
    ] if asked]
    if recipe.train.model_parallel is not None and fine_tuning:
        raise ConfigError(
            f"train.model_parallel ({recipe.train.model_parallel}) splits the model into "
            f"pieces on several devices, which {' and '.join(fine_tuning)} cannot find their "
            "stages or classifier in: fine-tune on one device, or on several with torchrun"
        )
    if recipe.train.tensorboard:
        check_tensorboard()


def recipe_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The values of recipe mapping `now` that differ from `before`'s, "key: before -> now"
    (as JSON: one line, whatever the value holds)."""
    earlier, later = flat_values(before), flat_values(now)
    return [f"{key}: {json.dumps(earlier.get(key))} -> {json.dumps(value)}"
            for key, value in later.items() if earlier.get(key) != value]


CHANGED_ON_RESUME = "# changed on resuming at step "  # recipe.yaml's record of a resume's --set


def open_run_dir(run: Run) -> None:
    """Rank 0, once it holds the run directory (canon.engine.rundir): the resolved recipe
    (with the commit, and which values each resume changed: the file holds the latest), the
    events file, and a line stating the run's plan."""
    recipe, config, ctx = run.recipe, run.recipe.train, run.ctx
    header = f"{RECIPE_HEADER}canon {canon.__version__}, commit {run.commit}\n"
    if run.step:  # a resumed run keeps its record of earlier resumes' changes
        header += "".join(_resume_records(run))
    if run.changed_on_resume:
        changes = "; ".join(run.changed_on_resume)
        header += f"{CHANGED_ON_RESUME}{run.step}: {changes}\n"
        print(f"resumed with other recipe values than its checkpoint's: {changes} (recipe.yaml "
              "records them)")
    text = header + dump_yaml(recipe.to_dict(), sort_keys=False)
    atomic_write(run.run_dir / "recipe.yaml", lambda temporary: temporary.write_text(text),
                 advice=ckpt.OUTPUT_DIR_ADVICE)
    if config.tensorboard:
        run.events = event_writer(run.run_dir)
    global_batch_size = config.batch_size * config.accum_steps * ctx.world_size
    val = "test images" if run.validates_on_test_set else "val images"
    print(
        f"{recipe.name}: {recipe.model.labelled(recipe.model.name)} on {recipe.data.dataset} "
        f"({run.train_size} train / {run.val_size} {val}, {run.num_classes} classes), "
        f"global batch {global_batch_size} = {config.batch_size} x {config.accum_steps} "
        f"accum x {ctx.world_size} device(s), peak lr {run.schedule.peak_lr:.4g}, "
        f"{_length(run)}, {config.amp if config.amp != 'none' else 'fp32'} on {ctx.device}; "
        f"writing {run.run_dir}"
    )
    if run.init_report is not None:
        print(run.init_report.summary())
        run.init_report.write(run.run_dir)
    if run.validates_on_test_set:
        print("validating on the test set (data.val_split is 0): no checkpoint is chosen on it "
              "(no best.pt); the final model's error is the result")
        if recipe.schedule.kind == "plateau":
            warnings.warn(
                "schedule.kind plateau cuts the learning rate when the validation error stops "
                "improving, and this run validates on the test set: the cuts, and so the "
                "reported test error, would be chosen on it. Hold out training images with "
                "data.val_split (ResNet s4.2 held out 5000 of CIFAR-10's)", stacklevel=2)
    if run.schedule.config != recipe.schedule or run.iterations != config.iterations:
        print(_scaled_counts_note(recipe, run.schedule.config, run.iterations, global_batch_size))


def _resume_records(run: Run) -> list[str]:
    """The records of earlier resumes that changed values, from the recipe.yaml of the run
    this one went on from (its own, or the folder it continues), made before this run's
    step: a resume from there or later saved nothing that trained with its values."""
    source = run.run_dir if run.resumed_from is None else ckpt.run_dir_of(run.resumed_from)
    try:
        lines = (source / "recipe.yaml").read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        step = line.removeprefix(CHANGED_ON_RESUME).partition(":")[0]
        if line.startswith(CHANGED_ON_RESUME) and step.isdigit() and int(step) < run.step:
            records.append(line)
    return records


def _length(run: Run) -> str:
    """How long the run goes, as it will run: epochs, steps, and where an iteration limit
    cuts the last epoch."""
    steps_left = run.total_steps - run.step
    text = f"{run.epochs} epoch(s) of {run.steps_per_epoch} steps"
    last_epoch_steps = run.total_steps - (run.epochs - 1) * run.steps_per_epoch
    if run.iterations is not None and last_epoch_steps < run.steps_per_epoch:
        text += (f", stopping at step {run.total_steps} (train.iterations), "
                 f"{last_epoch_steps} steps into epoch {run.epochs}")
    if run.step:
        text += f"; {steps_left} steps left"
    return text


# Loader processes above this many a core are refused (canon.engine.setup.check_recipe): a
# thousand on two cores stalled validation and ended in a traceback, with nothing saved.
MAX_WORKERS_PER_CORE = 4


def loader_workers(config: TrainSection) -> int:
    """train.workers, or by default one per core of this process's share of the machine
    (at most 8): more would only compete with each other and with the training step."""
    return config.workers if config.workers is not None else min(8, dist.cores_per_process())


def _loaders(
    train_set: Dataset, val_set: Dataset, config: TrainSection, ctx: dist.DistributedContext
) -> tuple[SeededOrder | ShardImages, Any, Any]:
    """(train_order, the training loader, the validation loader). The training loader reads
    what train_order sets before each epoch: a shard folder's stream (canon.data.shards),
    which orders, seeds and shares itself out, or the keys of a SeededOrder: an in-memory set
    whose augmentation has a batched form goes to the device whole (canon.data.batched); with
    train.decode_on_device an image folder's files are decoded and augmented a batch at a
    time on the device (canon.data.device_jpeg); any other set is augmented per sample in
    loader processes, seeded by SeededSamples. The validation loader reads this rank's
    shard (a stream's: its shards)."""
    workers = loader_workers(config)
    if isinstance(train_set, ShardImages):
        train_order, samples, train_keys = train_set, train_set, None
    else:
        train_order = SeededOrder(len(train_set), config.seed, ctx.rank, ctx.world_size)
        samples, train_keys = SeededSamples(train_set, config.seed), train_order.keys
    images = held_images(train_set) if config.data_on_device else None
    augment = None if images is None else BatchedCrop.of(train_set.transform,
                                                         *images.shape[-2:])
    decoded = None if augment is not None else _device_decoding(train_set, config)
    if augment is not None:
        train_loader: Any = DeviceBatches(images, train_set.labels, train_keys, augment,
                                          config.batch_size, config.seed, ctx.device)
    elif decoded is not None:
        files = build_loader(FileBytes(train_set), config.batch_size, train=True,
                             workers=workers, sampler=train_keys, seed=config.seed,
                             drop_last=True, collate_fn=collate_files,
                             pin_memory=False)  # decode_jpeg reads its input on the CPU
        files.worker_init_fn = loader_worker_init(files.worker_init_fn)
        train_loader = DeviceDecodedBatches(files, train_set, decoded, config.seed, ctx.device)
    else:
        train_loader = build_loader(
            samples, config.batch_size, train=True, workers=workers, sampler=train_keys,
            seed=config.seed, drop_last=True,
        )
        train_loader.worker_init_fn = loader_worker_init(train_loader.worker_init_fn)
    shard = None if isinstance(val_set, ShardImages) else eval_shard(len(val_set), ctx.rank,
                                                                      ctx.world_size)
    val_loader = build_loader(val_set, config.batch_size, train=False, workers=workers,
                              sampler=shard)
    val_loader.worker_init_fn = loader_worker_init(val_loader.worker_init_fn)
    return train_order, train_loader, val_loader


def _device_decoding(train_set: Dataset, config: TrainSection) -> DeviceCrops | None:
    """train.decode_on_device's pipeline for `train_set`, or None (with a warning saying why
    when it was asked for)."""
    if not config.decode_on_device:
        return None
    crops = DeviceCrops.of(train_set.transform) if isinstance(train_set, FolderImages) else None
    if crops is None:
        warnings.warn(
            "train.decode_on_device: decoding per image in loader processes instead, since "
            "only a whole image folder (no data.val_split, no shards) with a random-area or "
            "scale-jittered crop, a channel mean and bilinear resizing has an on-device form",
            stacklevel=2)
    return crops


def _for_this_rank(dataset: Dataset, config: TrainSection, ctx: dist.DistributedContext) -> Dataset:
    """A shard folder's split as this rank's loader reads it (ShardImages deals each rank its
    shards, in whole batches of its loader's workers); any other set as it is (samplers share
    it out)."""
    if not isinstance(dataset, ShardImages):
        return dataset
    return dataset.reading(seed=config.seed, rank=ctx.rank, world_size=ctx.world_size,
                           batch_size=config.batch_size, workers=loader_workers(config))


def _build_datasets(
    recipe: Recipe, ctx: dist.DistributedContext, state: dict[str, Any] | None
) -> Datasets:
    """build_datasets, first by each machine's first process, which computes and caches the
    training-set statistics the recipe needs; the machine's other processes wait for it and
    then read them from the cache instead of computing them at the same time. A resumed run
    with the data.normalization_from it started with reads the normalisation from its own
    checkpoint, which holds the source's: the source (a fine-tune's) may be gone by then."""
    data, checkpoint = recipe.data, (state or {}).get(ckpt.RESUMED_FROM)
    if state is not None and data.dataset == state["recipe"]["data"].get("dataset"):
        check_recorded_dataset(data.dataset, "resume")
    if (checkpoint is not None and data.normalization_from is not None
            and data.normalization_from == state["recipe"]["data"].get("normalization_from")):
        data = dataclasses.replace(data, normalization_from=checkpoint)
    build = functools.partial(
        build_datasets, data, strict=recipe.train.strict_data,
        workers=loader_workers(recipe.train),
    )
    if ctx.local_rank != 0:
        dist.barrier(ctx)
        return build()
    try:
        return build()
    finally:
        dist.barrier(ctx)  # also on failure: the others then fail the same way, not hang


def _placed_model(
    recipe: Recipe, model: nn.Module | None, num_classes: int, class_ids: list[str],
    ctx: dist.DistributedContext, *, fresh: bool,
) -> tuple[nn.Module, InitReport | None]:
    """The model built (same initial weights, from train.seed, on every rank), started from
    model.init_from when the run is `fresh` (a resumed run has its own weights), and put on its
    device(s)."""
    config = recipe.train
    torch.manual_seed(config.seed)
    if model is None:
        model = build_model(recipe, num_classes)
    init_report = None
    if recipe.model.init_from is not None and fresh:
        init_report = initialize_from(
            model, recipe.model.init_from, recipe.model.init_layers, class_ids
        )
    if config.model_parallel is not None:
        if ctx.world_size > 1 or config.compile:
            raise ConfigError(
                "--model-parallel (train.model_parallel) runs one process without "
                "torch.compile: launch it without torchrun and drop --compile (train.compile)"
            )
        model = parallelize(model, config.model_parallel, ctx.device)  # pieces on their devices
        if ctx.device.type != "cuda":
            print(f"--model-parallel {config.model_parallel}: every piece on {ctx.device}, one "
                  "after another: the split's arithmetic without its speed")
    else:
        model = model.to(ctx.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, init_report


def build_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """The recipe's model (a model given to `train` is used as it is): its builder called with
    model.options, and zero_init_residual, which the ResNet builders alone take."""
    section = recipe.model
    options = {**section.options, **({"zero_init_residual": True}
                                     if section.zero_init_residual else {})}
    check_num_classes(num_classes)  # not the options' fault, below
    try:
        return create_model(section.name, num_classes, **options)
    except (ConfigError, TypeError) as error:  # an option it lacks, or a wrong value
        if section.zero_init_residual and "zero_init_residual" in str(error):  # the one
            raise ConfigError(f"model.zero_init_residual is for ResNets; {section.name} has no "
                              f"residual blocks ({error})") from error
        if not section.options:  # then the error is the builder's own, not the recipe's
            raise
        if isinstance(error, ModelOptionError | TypeError):
            raise ConfigError(f"model.options {section.options} do not fit {section.name}'s "
                              f"builder ({error})") from error
        raise ConfigError(f"{section.name} with model.options {section.options}: {error}"
                          ) from error  # the builder's own check of a value: name where it is


def _scaled_counts_note(
    recipe: Recipe, schedule: ScheduleSection, iterations: int | None, global_batch_size: int
) -> str:
    """What scale_iteration_counts changed, for the run's log."""
    changes = [
        f"schedule.{key} {getattr(recipe.schedule, key)} -> {getattr(schedule, key)}"
        for key in ("milestones", "step_size", "warmup_iterations")
        if getattr(recipe.schedule, key) != getattr(schedule, key)
    ]
    if iterations != recipe.train.iterations:
        changes.append(f"train.iterations {recipe.train.iterations} -> {iterations}")
    return (
        f"iteration counts are stated for a global batch of {recipe.optimizer.base_batch_size}; "
        f"at {global_batch_size} (the same images seen): " + ", ".join(changes)
    )


def _check_same_global_batch(run: Run, state: dict[str, Any]) -> None:
    """A checkpoint's progress (optimizer steps taken, the position in the epoch, where the
    warm-up ended) counts steps of its global batch: at another, the schedule and the epoch's
    end would fall elsewhere."""
    saved = state["recipe"]["train"]  # as written: any key it has since lost is no matter
    batch, accum = saved["batch_size"], saved.get("accum_steps", 1)
    ranks, config = len(state["rng"]), run.recipe.train
    before = batch * accum * ranks
    now = config.batch_size * config.accum_steps * run.ctx.world_size
    if before != now:
        raise ConfigError(
            f"cannot resume at global batch {now} ({config.batch_size} x {config.accum_steps} "
            f"accum x {run.ctx.world_size} process(es)): the checkpoint's {state['step']} steps "
            f"were of {before} ({batch} x {accum} x {ranks}). Resume "
            "with a batch, --accum (train.accum_steps) and process count that multiply to "
            f"{before}, or start a new run from its weights with --init-from (model.init_from)"
        )


def _check_same_towers(run: Run, state: dict[str, Any]) -> None:
    """The two-tower split holds each layer's weights as two parameters: its optimizer state
    (momentum) does not fit the one-tower model's, nor the reverse."""
    towers = ["towers" in str(spec) for spec in (state["recipe"]["train"].get("model_parallel"),
                                                 run.recipe.train.model_parallel)]
    if towers[0] != towers[1]:
        before, now = (("with" if split else "without") for split in towers)
        raise ConfigError(
            f"cannot resume {now} --model-parallel towers a run trained {before} it: the "
            "optimizer state (momentum) of the towers holds two parameters a layer, the plain "
            "model's one. Resume as it was trained, or start a new run from its weights (which "
            "load either way) with --init-from")


def _check_same_shard_stream(run: Run, state: dict[str, Any]) -> None:
    """A shard folder's epochs are dealt by its shards, the process count, batch size and
    loader workers (canon.data.shards): with others, a resumed run would read other images,
    and epochs of another length, unnoticed. (Checkpoints from before canon saved the workers,
    or the shards, pass those checks.)"""
    if not isinstance(run.train_order, ShardImages) or "loader_workers" not in state:
        return
    shards, before = run.train_order.layout(), state.get("train_shards")
    if before is not None and before != shards:
        rest = ("the rest of the epoch would read other images" if state["step_in_epoch"]
                else "its next epochs would be dealt other images than an unstopped run's")
        raise ConfigError(
            f"cannot resume on {run.recipe.data.dataset}: its training shards are not the ones "
            f"the checkpoint's run was dealt ({len(before)} shards then, {len(shards)} now: "
            f"re-packed?), so {rest}. Resume on the pack it trained on (canon pack makes the "
            "same shards again from the same folder with the same --shard-size), or start a "
            "new run from its weights with --init-from")
    config = run.recipe.train
    saved = state["loader_workers"]  # each rank's; rank 0's alone before canon kept them all
    workers = saved[min(run.ctx.rank, len(saved) - 1)] if isinstance(saved, list) else saved
    ranks, batch = len(state["rng"]), state["recipe"]["train"]["batch_size"]
    now_workers = loader_workers(config)
    # No worker process reads as one: the stream is dealt to max(workers, 1) parts.
    if (ranks, batch, max(workers, 1)) != (run.ctx.world_size, config.batch_size,
                                           max(now_workers, 1)):
        raise ConfigError(
            f"cannot resume a run on a shard folder with {run.ctx.world_size} process(es), "
            f"batch {config.batch_size} and {now_workers} loader worker(s): its epochs were "
            f"dealt to {ranks}, {batch} and {workers}. Resume with --batch-size {batch} "
            f"--workers {workers} on {ranks} process(es)")


def _check_same_training_set(run: Run, state: dict[str, Any]) -> None:
    """A checkpoint's epochs were of its training set: with other images held out, the new
    validation set would hold images trained on (and best.pt be chosen on it), and its step
    counts would fall elsewhere in epochs of another size."""
    saved = state["recipe"]["data"]
    for key in ("val_split", "val_split_seed"):
        before, now = saved.get(key, 0), getattr(run.recipe.data, key)
        if before != now:
            raise ConfigError(
                f"cannot resume with data.{key} {now}: the checkpoint's run trained with "
                f"{before}, so the images it holds out would change; resume without changing "
                "it, or start a new run from its weights with --init-from")
    before = state.get("train_size")  # older checkpoints do not say
    if before is not None and before != run.train_size:
        raise ConfigError(
            f"cannot resume on {run.recipe.data.dataset}: its training set has {run.train_size} "
            f"images where the checkpoint's run trained on {before}; resume on the same "
            "images, or start a new run from its weights with --init-from")


def _restore(run: Run, state: dict[str, Any]) -> None:
    """Continue from a checkpoint: weights, optimizer, schedule, progress, and every rank's
    random generator states and partial epoch sums, at the checkpoint's global batch. Resumed
    with another number of processes (and a batch or accum making up for it), each rank's
    generator is reseeded from (seed, rank, step) instead: the run goes on, but not
    bit-identically (and from a mid-epoch checkpoint it skips as many steps of the epoch, which
    now hold other images). A cosine schedule spans the run's length: resuming with more
    epochs changes its shape."""
    ctx = run.ctx
    _check_same_global_batch(run, state)
    _check_same_training_set(run, state)
    _check_same_shard_stream(run, state)
    recipe_groups = [{k: v for k, v in group.items() if k != "params"}
                     for group in run.optimizer.param_groups]
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as error:  # other layer names or shapes, other groups
        _check_same_towers(run, state)
        raise ConfigError(
            f"cannot resume: the checkpoint's model ({state.get('model_name')}) or optimizer "
            f"groups do not fit this run's {run.recipe.model.name} with {run.num_classes} "
            f"classes ({first_line(error)}); resume without changing model, data classes or "
            "optimizer.no_decay_bn_bias / backbone_lr_scale"
        ) from None
    # The recipe's hyperparameters (a --set on resume) over the checkpoint's, and "fused" for
    # this run's device: its state (momentum buffers) carries on, the lr is the schedule's at
    # every step.
    for group, values in zip(run.optimizer.param_groups, recipe_groups, strict=True):
        group.update(values)
    run.schedule.load_state_dict(state["schedule"])
    run.precision.load_state_dict(state["scaler"])
    if run.average is not None and state["ema"] is not None:  # None: not started (Polyak)
        run.average.load_state_dict(state["ema"])
    run.epoch, run.step, run.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
    # An epoch the iteration limit cut short goes on, its row replaced at its end; where the
    # limit is still where it cut, the run has finished, that row its last.
    run.cut_short = run.step == run.total_steps and any(
        row["epoch"] == run.epoch + 1 and row.get("step") == run.step for row in state["metrics"])
    run.metrics = [row for row in state["metrics"] if row["epoch"] <= run.epoch + run.cut_short]
    saved_ranks = len(state["rng"])  # one RNG state and one set of epoch totals per rank
    if saved_ranks == ctx.world_size:
        ckpt.restore_rng_state(state["rng"][ctx.rank])
        # Older checkpoints lack the checked_* counts: they start from zero.
        run.totals = {**new_totals(), **state["epoch_totals"][ctx.rank]}
        return
    # Another number of processes: there is no saved stream for this rank, so each rank's is
    # reseeded from (seed, rank, step), and rank 0 carries the epoch's totals so far.
    if ctx.is_main:
        print(f"the checkpoint was written by {saved_ranks} process(es), this run has "
              f"{ctx.world_size}: random streams reseeded from (seed, rank, step)")
    seed = (spread_seed(run.recipe.train.seed) + run.step) * 10_007 + ctx.rank
    torch.manual_seed(seed % 2**63)
    run.totals = new_totals()
    if ctx.is_main:
        for key in ("loss", "correct", "images", "skipped", "checked_correct", "checked_images"):
            run.totals[key] = sum(totals.get(key, 0) for totals in state["epoch_totals"])
        run.totals["seconds"] = state["epoch_totals"][0]["seconds"]


__all__ = ["Run", "build_model", "new_totals", "set_up"]
