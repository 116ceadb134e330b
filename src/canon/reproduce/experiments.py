"""The papers' experiments as data (`canon reproduce NAME`): which recipes each trains and with
how many seeds, how each mode shortens them, what the paper reported beside them, and which
analysis (canon.reproduce.analyses) turns the runs into a table, plots and the qualitative
finding. Nothing here imports torch, so `canon reproduce --list` answers at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from canon.errors import ConfigError


@dataclass(frozen=True)
class Mode:
    """How a mode shortens the paper's recipes: the iteration limit becomes `iterations` (at
    the recipe's base batch) and every other iteration count (the lr milestones, a warm-up)
    shrinks in proportion; recipes without a warm-up of their own get a linear one from 0.1x
    the lr over the first `warmup_iterations` of them; on `dataset` instead of the recipe's,
    with `overrides` on top, and `recipe_overrides[name]` on top of those for recipe `name`;
    `train_images`/`test_images` (micro only) train and validate on that many images spread
    over the dataset's splits."""

    name: str
    describe: str  # one line for the report
    iterations: int | None = None  # None: the recipes' own length
    warmup_iterations: int = 0
    dataset: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    recipe_overrides: Mapping[str, tuple[tuple[str, Any], ...]] = field(default_factory=dict)
    train_images: int | None = None
    test_images: int | None = None


def _cifar(family: str, depths: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(f"{family}{depth}-cifar10" for depth in depths)


_RESNETS = _cifar("resnet", (20, 32, 44, 56, 110))

MODES = {mode.name: mode for mode in (
    Mode("full", "the paper's recipes unchanged"),
    # 64k iterations -> 1,170 at batch 128 (lr / 10 at 585 and 878): exactly 30 epochs of the
    # sample's 39 steps, so the last epoch's training error is over a whole epoch (the paper's
    # 64k are 164 epochs of CIFAR-10's 390). The bundled sample is CIFAR-10's first 500
    # training and 100 test images per class: a tenth of the data, no download. An earlier
    # quick mode of 390 steps showed the plain half of Fig. 6 but not the residual half:
    # ResNet-44/56/110 blow up in their first steps at lr 0.1 (ResNet-56's loss rises from 3.0
    # to 9.9 within 5 steps) and fall back to chance, a plateau the paper's 32k steps at lr 0.1
    # leave but 195 did not. The warm-up is the paper's own remedy for ResNet-110 (lr 0.01
    # first, s4.2), made gradual (Goyal et al. 2017): a constant 0.01 for 40 steps still blew
    # up at the switch to 0.1; 0.01 -> 0.1 over 100 steps trained ResNet-56 to loss 1.45 by
    # step 150. Every net gets it, plain and residual alike.
    # With the paper's initialisation, ResNet-56 still ended 2.4 points of training error
    # above ResNet-20 (26.1 against 23.7%): it learns less per step early on, and 1,170 steps
    # are 1.8% of the paper's. Starting each residual block as its shortcut (last BN gamma 0,
    # Goyal et al. 2017 s5.1) turned that round: ResNet-56 ended below ResNet-20 with both
    # seeds tried (28.1 against 32.5% with seed 0, 29.1 against 31.6% with seed 1), though
    # both fit less than with the paper's init, the shallower more so. It is Goyal et al.'s
    # remedy for early training of deep ResNets, as the warm-up is; plain nets, which have no
    # shortcut to start as, keep the paper's initialisation.
    Mode("quick", "the 64k iterations shortened to 1,170 at batch 128 (30 epochs; lr / 10 at "
         "585 and 878) with a linear warm-up from lr 0.01 over the first 78 (2 epochs), "
         "ResNet blocks starting as their shortcuts (last BN gamma 0), on the bundled sample "
         "(5,000 CIFAR-10 training and 1,000 test images)",
         iterations=1170, warmup_iterations=78, dataset="sample",
         # The sample sits in memory (loader processes would only compete for the cores);
         # channels_last is faster on a CPU (ResNet-20: 1.2x, one thread), the model the same.
         overrides=(("train.workers", 0), ("train.channels_last", True)),
         recipe_overrides={name: (("model.zero_init_residual", True),) for name in _RESNETS}),
    # For canon's tests: 2 epochs of 2 steps of 16 images; it shows nothing. Its 2 iterations
    # are at a base batch of 32 (4 steps of 16): one iteration would set both of the
    # recipes' lr milestones at it.
    Mode("micro", "2 epochs of 2 steps of 16 images on 32 training and 32 test images of "
         "the bundled sample (for canon's tests: it shows nothing)",
         iterations=2, dataset="sample",
         overrides=(("train.workers", 0), ("train.batch_size", 16),
                    ("optimizer.base_batch_size", 32)),
         train_images=32, test_images=32),
)}

# Imagenette's recipes count epochs, not iterations: quick trains the 5-epoch run alone.
IMAGENETTE_MODES = {mode.name: mode for mode in (
    MODES["full"],
    Mode("quick", "the 5-epoch run alone, unchanged (ResNet-34-D: about 31 minutes on two "
         "Zen 4 cores in float32, longer on slower CPUs, its ten-crop evaluation besides)"),
    Mode("micro", "1 epoch of 2 steps of 16 images on 32 training and 10 validation images "
         "of --data (for canon's tests: it shows nothing)",
         overrides=(("train.workers", 0), ("train.batch_size", 16), ("train.epochs", 1)),
         train_images=32, test_images=10),
)}


@dataclass(frozen=True)
class Experiment:
    """One of the papers' findings, reproduced by training `recipes` (`quick_recipes` in
    quick mode when given, `micro_recipes` in micro mode), `runs` seeds each (None: one, and
    --runs does not apply; at least `min_runs`), shortened as its `modes` say."""

    name: str
    cites: str  # the paper's figure or table
    shows: str  # what the experiment shows, one sentence
    plot: str  # what its plots draw
    recipes: tuple[str, ...]
    micro_recipes: tuple[str, ...]
    analysis: str  # a key of canon.reproduce.analyses.ANALYSES
    paper: tuple[str, ...] = ()  # the paper's numbers the recipes' `reported` does not hold
    runs: int | None = None
    min_runs: int = 1
    paper_params: Mapping[str, float] = field(default_factory=dict)  # recipe: millions
    # recipe: the paper's (mean, std) over runs, where it gives them (its reported error may
    # be the best run's)
    paper_means: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    quick_recipes: tuple[str, ...] | None = None
    modes: Mapping[str, Mode] = field(default_factory=lambda: MODES)

    def recipes_in(self, mode: str) -> tuple[str, ...]:
        """The recipes this experiment trains in `mode`."""
        if mode == "micro":
            return self.micro_recipes
        if mode == "quick" and self.quick_recipes is not None:
            return self.quick_recipes
        return self.recipes

    def mode(self, name: str) -> Mode:
        """How `name` ("full", "quick" or "micro") shortens this experiment's recipes."""
        if name not in self.modes:
            raise ConfigError(f"unknown mode {name!r}; use one of {', '.join(self.modes)}")
        return self.modes[name]


_MICRO_DEPTHS = (20, 32)
_MICRO = (*_cifar("plain", _MICRO_DEPTHS), *_cifar("resnet", _MICRO_DEPTHS))
# Quick mode trains the shallowest and the deepest net Fig. 6 plots of both kinds, four runs
# that fit a CPU in under an hour; every CIFAR experiment's quick report reads them.
_QUICK_DEPTHS = (20, 56)
_QUICK = (*_cifar("plain", _QUICK_DEPTHS), *_cifar("resnet", _QUICK_DEPTHS))

EXPERIMENTS = {experiment.name: experiment for experiment in (
    Experiment(
        name="degradation", cites="He et al. 2015, Fig. 6 (s4.2)",
        shows="the deeper plain net has higher training error than the shallower one (it is "
        "not overfitting), while the deeper ResNet has lower training error",
        plot="training (thin, dashed) and test (bold) top-1 error by iteration, plain nets "
        "and ResNets in two panels",
        recipes=(*_cifar("plain", (20, 32, 44, 56)), *_RESNETS), micro_recipes=_MICRO,
        quick_recipes=_QUICK, analysis="degradation",
        paper=("Fig. 6 plots the curves without tabulating them: plain-20/32/44/56 end with "
               "higher training and test error the deeper they are (plain-110 above 60%, not "
               "plotted); ResNet-20/32/44/56/110 end lower the deeper they are.",),
    ),
    Experiment(
        name="cifar-table6", cites="He et al. 2015, Table 6",
        shows="the test error of the final ResNet-20/32/44/56/110 falls with depth "
        "(the final model's error, never an epoch chosen on the test set)",
        plot="final test error by depth, ours (mean and std over seeds) beside the paper's",
        recipes=_RESNETS, micro_recipes=_cifar("resnet", _MICRO_DEPTHS),
        quick_recipes=_cifar("resnet", _QUICK_DEPTHS), analysis="table6", runs=1,
        paper=("ResNet-110's 6.43 is the best of 5 runs; their mean is 6.61 +- 0.16.",
               "A widely used public PyTorch reproduction reports 8.27 / 7.37 / 6.90 / 6.61 / "
               "6.32, but chose its best epoch on the test set; canon reports the final "
               "model."),
        paper_params={"resnet20-cifar10": 0.27, "resnet32-cifar10": 0.46,
                      "resnet44-cifar10": 0.66, "resnet56-cifar10": 0.85,
                      "resnet110-cifar10": 1.7},
        paper_means={"resnet110-cifar10": (6.61, 0.16)},
    ),
    Experiment(
        name="responses", cites="He et al. 2015, Fig. 7",
        shows="the responses of residual functions (std of each 3x3 layer's output after BN) "
        "are smaller than those of plain layers, and smaller in the deeper ResNet",
        plot="response std of every 3x3 layer, in network order and sorted by size",
        recipes=(*_cifar("plain", (20, 56)), *_cifar("resnet", (20, 56, 110))),
        micro_recipes=_MICRO, quick_recipes=_QUICK, analysis="responses",
        paper=("Fig. 7 gives no numbers: ResNets' responses are generally smaller than their "
               "plain counterparts', and the deeper ResNet's smaller still.",),
    ),
    Experiment(
        name="ensembles", cites="Krizhevsky et al. 2012, Table 2; He et al. 2015, s4.1",
        shows="averaging the softmax outputs of independently seeded nets gives a lower "
        "error than the nets alone",
        plot="top-1 test error of each seeded ResNet-20 and of their ensemble",
        recipes=_cifar("resnet", (20,)), micro_recipes=_cifar("resnet", (20,)),
        analysis="ensembles", runs=5, min_runs=2,
        paper=("AlexNet (ImageNet, Table 2): one CNN 40.7% top-1 / 18.2% top-5 error, five "
               "CNNs averaged 16.4% top-5.",),
    ),
    Experiment(
        name="imagenette", cites="fast.ai Imagenette leaderboard, 128 px (not a paper)",
        shows="a recipe made of the papers' parts (canon's resnet34d-imagenette5/20) reaches "
        "the public leaderboard's top-1 accuracy on Imagenette-160 after 5 and 20 epochs",
        plot="training (thin, dashed) and validation (bold) top-1 error by epoch",
        recipes=("resnet34d-imagenette5", "resnet34d-imagenette20"),
        quick_recipes=("resnet34d-imagenette5",), micro_recipes=("resnet34d-imagenette5",),
        analysis="imagenette", modes=IMAGENETTE_MODES,
        paper=("The leaderboard (fast.ai's imagenette README, 128 px, one GPU): 87.43% top-1 "
               "after 5 epochs, 91.57% after 20, by an xresnet50 with Mish, self-attention, "
               "the Ranger optimizer and a flat-then-cosine schedule; canon trains a ResNet-34 "
               "with a 3x3 stem and averaged projections (ResNet-D) with SGD.",
               "The finding is judged on centre crops, the leaderboard's protocol; the "
               "ten-crop column scores the same models under AlexNet's (s4.1: the mean softmax "
               "of the four corner and the centre crops and their reflections).",
               "Needs the Imagenette-160 folder: --data /path/to/imagenette2-160."),
    ),
)}

def get_experiment(name: str) -> Experiment:
    """The experiment called `name`; ConfigError listing the others."""
    if name in EXPERIMENTS:
        return EXPERIMENTS[name]
    raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)} "
                      "(canon reproduce --list)")


def listing() -> str:
    """What `canon reproduce --list` prints: each experiment and what --quick makes of it."""
    width = max(map(len, EXPERIMENTS))
    return "\n".join(
        f"{e.name:<{width}}  {e.cites}: {e.shows} ({_run_count(e)})\n{'':<{width}}  "
        f"--quick: {e.mode('quick').describe}{_quick_runs(e)}" for e in EXPERIMENTS.values())


def _quick_runs(experiment: Experiment) -> str:
    """Which recipes --quick trains, where they are not the experiment's own."""
    quick = experiment.recipes_in("quick")
    return "" if quick == experiment.recipes else f"; trains {', '.join(quick)}"


def _run_count(experiment: Experiment) -> str:
    count = len(experiment.recipes)
    if experiment.runs is None:
        return f"{count} runs"
    return f"{count} recipe(s) x --runs N seeds, default {experiment.runs}"
