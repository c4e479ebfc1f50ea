"""Experiment configuration (Sacred), shared by train.py and test.py.

The DEFAULT is the network this project's users asked for: the local prototype head on PANet's
VGG-16 (ImageNet weights), not the authors' ResNet-50; it differs from the authors' code in the
encoder, the learning-rate milestones (the paper's text), the evaluation preset ('inclusive') and
model selection on held-out volumes. REPRODUCTION.md lists every difference and the option that
switches it.
Named configs:
  official  the authors' code (docs/method.md): resnet50_lslpn, max vote,
            milestones 800/1600/2400, 512 x 512, batch 4, 10,000 steps, ImageNet init, no alignment,
            evaluation preset 'official' (their eval.py)
  paper     the paper's text where it differs from their code: milestones 2500/5000/7500
  demo      sized for 2 CPU cores and the synthetic phantom (make demo)
  panet     the PANet baseline exactly as PANet's code: global prototypes (model.head 'panet') with
            PANet's prototype alignment loss
  senet     the SENet baseline (Roy et al. 2020; models/senet.py): its own architecture, Dice loss,
            per-arm SGD and 20-epoch schedule (training/objective.py), batch 2, no augmentation
  senet_demo  after `demo senet`: SENet's schedule shortened for the CPU demo (make demo)
  tiny      a seconds-long run for the tests
  selfsup   self-supervised episodes from superpixels (no labels; add to a size config, e.g. `demo selfsup`)

Override anything on the command line, e.g.
  python train.py with demo fold=2 model.n_grid=4
"""
import logging
import os
import shutil
import sys
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # sacred 0.8.7 on setuptools 80

from docopt import docopt  # noqa: E402
from sacred import Experiment  # noqa: E402
from sacred.arg_parser import get_config_updates  # noqa: E402
from sacred.observers import FileStorageObserver  # noqa: E402,F401  (attached by the entry points)
from sacred.utils import SacredError, create_basic_stream_logger, ensure_wellformed_argv  # noqa: E402

from dataloaders.selfsup_episodes import WARP_DEFAULTS  # noqa: E402
from models.fewshot import OFFICIAL_MODEL_CONFIG, PLUS_DEFAULTS  # noqa: E402
from training.objective import SENET_DEFAULTS  # noqa: E402
from util.cli import exit_with_message  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.paths import output_error_message  # noqa: E402

ex = Experiment("LSLPN", save_git_info=False)


@ex.config
def default_config():
    name = None                 # run folder name under path.log_dir (None: <method>_<class_setting>_fold<F>)
    seed = 1234                 # controls episodes, augmentation, initialisation, evaluation
    device = "auto"             # 'auto' (CUDA when present), 'cpu' or 'cuda'
    amp = False                 # mixed precision: True (CUDA: bf16 where supported, else fp16; CPU: off),
                                # 'bf16', 'fp16'
    channels_last = False       # channels_last memory format for the model (CUDA and CPU)
    num_workers = 0             # data loader workers (0: in-process)

    # Folds (the paper's four folds, docs/method.md): the test organ(s) of each fold, never trained on.
    fold = 0
    label_sets = [["liver"], ["spleen"], ["kidney_right", "kidney_left"], ["psoas_right", "psoas_left"]]
    class_setting = "six_organs"    # 'six_organs' or 'all_structures'

    # Episodes
    input_size = 512            # slices are resized to input_size x input_size for the model
    n_ways = 1
    n_shots = 1
    n_queries = 1

    # Optimisation (SGD as in the paper)
    batch_size = 4              # episodes per step
    n_steps = 10000
    lr = 1e-3
    momentum = 0.9
    weight_decay = 5e-4
    lr_milestones = [2500, 5000, 7500]
    lr_gamma = 0.1
    grad_clip = 0.0             # 0: no clipping
    # Boundary loss (Kervadec et al., MIDL 2019; models/boundary_loss.py), beyond the paper: the prototype
    # methods train on L_query + boundary_weight * L_B (+ the alignment loss); 0: off (SENet: unused).
    boundary_weight = 0.0

    # Augmentation: brightness, contrast, gamma; each with probability p, factor in [low, high].
    augment = {"p": 0.5, "brightness": [0.5, 2.0], "contrast": [0.5, 2.0], "gamma": [0.5, 2.0]}

    # Where episodes come from: 'labels' (organ slices of PREP/index.json) or 'superpixels'
    # (self-supervised, no label read: PREP/superpixels from scripts/make_superpixels.py; named config
    # `selfsup`). selfsup.min_pixels: smallest superpixel (pixels of the prepared slice) that may be the
    # foreground; selfsup.warp: each view's random affine + elastic warp, never a flip (dataloaders/warp.py).
    # selfsup.episodes: 'project' (this project's recipe: min_pixels, warp, augment) or 'alpnet' (SSL-ALPNet's
    # own: id below the slice's top one, its affine + elastic + gamma; min_pixels / warp / augment unused).
    episodes = "labels"
    selfsup = {
        "episodes": "project",
        "min_pixels": 400,
        "warp": dict(WARP_DEFAULTS),   # dataloaders/warp.py WarpParams: rotate, scale, shear, translate,
                                       # elastic_alpha, elastic_sigma
    }

    model = {
        "method": "prototype",    # 'prototype' (LSLPN/PANet, models/fewshot.py) or 'senet' (SENet baseline)
        "encoder": "vgg16",       # 'vgg16' (PANet), 'resnet50_lslpn' (paper), 'cnn_small' (CPU demo)
        "n_grid": 8,              # cells per side; 1 = global prototypes (PANet)
        "overlap": True,          # cell stride half the cell (True) or a full cell (False)
        "vote": "max",            # 'max' (paper), 'mean', 'cover'
        "resolution": "image",    # 'image' (paper semantics) or 'feature' (fast)
        "min_pixels": 10,         # cells with this many or fewer class pixels get the zero prototype
        "scale": 20.0,            # cosine similarity multiplier (PANet)
        "align": False,           # alignment loss ('panet' head: PANet's; 'local' head: this project's)
        "align_weight": 1.0,
        "head": "local",          # 'local' (LSLPN) or 'panet' (PANet's global prototypes, exactly)
        "pretrained": True,       # ImageNet weights via torchvision (cached in TORCH_HOME); False: random
        # 2.5D input (beyond the paper, off by default; prototype methods only): 1 = each image is one
        # axial slice (the paper), 3 = slices z - 1, z, z + 1 as the encoder's 3 channels
        # (dataloaders/neighbours.py: a neighbour outside the volume or not available for training is the
        # centre slice; needs a prepared folder with train/<id>_neighbours.npy)
        "input_slices": 1,
        # LSLPN+ (beyond the paper, models/lslpn_plus.py, docs/lslpn_plus.md), off by default
        # (models.fewshot.PLUS_DEFAULTS): grids (multi-scale: n_grid of every scale, e.g. [4, 8, 16];
        # [] = n_grid alone), grid_fusion (how the scales' logits combine: 'mean' or 'max'), query_rounds
        # (query-informed prototype rounds, 0: off), query_weight (weight of the query's own cell
        # prototypes in the mix), query_confidence (softmax probability a query pixel needs to join its
        # own prototypes)
        **PLUS_DEFAULTS,
    }

    # SENet baseline options (used with model.method='senet'; Roy et al. 2020 and its official code;
    # training/objective.py SENET_DEFAULTS): official_bug (True: the official conditioner's 4th encoder
    # call reuses encode3), double_softmax (True: Dice loss on softmax(softmax(logits)), as the official
    # training), epochs (n_steps are split into this many epochs for the schedule), lr_step_epochs (StepLR
    # step size in epochs, stepped at each epoch's start), gamma_segmenter / gamma_conditioner (StepLR
    # gamma of each arm)
    senet = dict(SENET_DEFAULTS)

    path = {
        "data_dir": "data/prepared",   # output of scripts/prepare_visceral.py
        "init_path": None,             # local weights file for the encoder (torchvision checkpoint or an
                                       # official-code snapshot); overrides model.pretrained
        "init_from": None,             # a train.py checkpoint whose model weights start this run
                                       # (fine-tuning, e.g. after self-supervised training)
        "log_dir": "runs",             # Sacred observer folders go under here
    }

    # Checkpoints, validation, logging
    save_every = 1000
    val_every = 1000            # volumetric Dice on the held-out silver volumes; keeps best.pth
    val_split = "val"           # 'val' (held-out silver, default) or 'gold': select best.pth on the TEST
                                # volumes, as the official code does (test-set selection; a warning says so)
    print_every = 100
    resume = False              # continue the latest run of this config from its last.pth

    # Evaluation (test.py)
    eval = {
        "preset": "inclusive",    # 'inclusive' (this project: inclusive organ range, centre slices),
                                  # 'official' (the authors' eval.py exactly), 'senet', 'alpnet', 'thirds'
                                  # (evaluation/protocols.py)
        "support": "default",     # a patient id, 'default' (10000132 if present else first gold), or 'all'
        "n_shots": 1,
        "snapshots": {},          # method name -> checkpoint path, e.g. {"LSLPN": "runs/.../best.pth"}
        "organs": None,           # organ names to evaluate; None: the fold's label_sets[fold]
        "split": "gold",          # 'gold' (test) or 'val'
        "batch_size": 16,         # query slices per forward pass
        "save_predictions": True, # NIfTI masks in each query's original geometry
        # LSLPN+ head options at test time only (docs/lslpn_plus.md; a value other than the plain head's)
        "head_options": dict(PLUS_DEFAULTS),
        "adapt_steps": 0,         # test-time adaptation: SGD steps on views of each support slice (0: off)
        "adapt_lr": 1e-2,         # its learning rate
    }


# The authors' network and head (docs/method.md), shared by the `official` and `paper` configs.
AUTHORS_MODEL = {**OFFICIAL_MODEL_CONFIG, "pretrained": True}


@ex.named_config
def official():
    # The authors' code (docs/method.md; REPRODUCTION.md has the differences of the default).
    input_size = 512
    batch_size = 4
    n_steps = 10000
    lr = 1e-3
    momentum = 0.9
    weight_decay = 5e-4
    lr_milestones = [800, 1600, 2400]
    model = dict(AUTHORS_MODEL)
    eval = {"preset": "official"}


@ex.named_config
def paper():
    # The paper's text where it differs from the authors' code: lr x 0.1 every 2,500 steps.
    input_size = 512
    batch_size = 4
    n_steps = 10000
    lr = 1e-3
    momentum = 0.9
    weight_decay = 5e-4
    lr_milestones = [2500, 5000, 7500]
    model = dict(AUTHORS_MODEL)
    eval = {"preset": "official"}


@ex.named_config
def lslpn_plus():
    # LSLPN+ (beyond the paper; docs/lslpn_plus.md): the options chosen on CHAOS-T2 validation scans by
    # `scripts/bench_chaos.py --lslpn-plus`, as measured. Training: LSLPN plus the boundary loss. test.py:
    # the multi-scale head (eval.head_options, applied to the snapshots it evaluates; not used in
    # training) and test-time adaptation on each support slice (eval.adapt_steps).
    boundary_weight = 0.3
    eval = {"head_options": {"grids": [4, 8], "grid_fusion": "mean"}, "adapt_steps": 20, "adapt_lr": 1e-2}


@ex.named_config
def panet():
    # PANet baseline as PANet's code: global prototypes (prototypes from upsampled features, scores at
    # feature resolution) with PANet's prototype alignment loss.
    model = {"head": "panet", "n_grid": 1, "align": True}


@ex.named_config
def senet():
    # SENet baseline (the SENet paper's protocol, docs/method.md): 20 epochs x 101 batches of 2
    # one-shot episodes, SGD lr 1e-3, momentum 0.99, weight decay 1e-4 per arm, StepLR per `senet`,
    # Dice loss, no augmentation.
    # VISCERAL: the released models saw 256 x 256 slices (add input_size=256); H, W divisible by 16.
    model = {"method": "senet"}
    batch_size = 2
    n_steps = 2020
    lr = 1e-3
    momentum = 0.99
    weight_decay = 1e-4
    augment = {"p": 0.0}


@ex.named_config
def senet_demo():
    # Use after `demo senet` (make demo: `with demo senet senet_demo`). SENet scaled for 2 CPU cores so
    # that its 4 folds add a few minutes to the demo: its 20-epoch schedule is squeezed into 200 steps
    # (10 per "epoch") at 64 x 64 slices, lr 1e-2 instead of 1e-3 (at 1e-3 the loss did not move in a
    # short run); the sizing measurements are in REPRODUCTION.md. Evaluation runs each snapshot at its
    # own input size (SENet at 64, the others at 128).
    input_size = 64
    n_steps = 200
    lr = 1e-2
    val_every = 100
    save_every = 100


@ex.named_config
def demo():
    # Sized for 2 CPU cores and the synthetic phantom (make demo trains 8 of these).
    input_size = 128
    n_steps = 600
    batch_size = 4
    lr = 1e-2
    lr_milestones = [450]
    save_every = 100
    val_every = 100
    print_every = 50
    class_setting = "all_structures"
    model = {"encoder": "cnn_small", "resolution": "image", "pretrained": False}
    path = {"data_dir": "data/prepared_phantom"}
    eval = {"batch_size": 64}


@ex.named_config
def tiny():
    # A seconds-long run for the tests.
    input_size = 64
    n_steps = 6
    batch_size = 2
    lr = 1e-2
    lr_milestones = [4]
    save_every = 2
    val_every = 3
    print_every = 2
    class_setting = "all_structures"
    model = {"encoder": "cnn_small", "resolution": "feature", "pretrained": False}
    eval = {"batch_size": 8}


@ex.named_config
def selfsup():
    # Self-supervised training from superpixels (SSL-ALPNet's episodes; no label is read). Combine with
    # a size config, e.g. `with demo selfsup path.data_dir=PREP`, PREP made by scripts/make_superpixels.py.
    # Validation uses PREP's labeled held-out volumes when it has >= 2 of them; else it is off and the
    # snapshot is last.pth after n_steps (training says so).
    episodes = "superpixels"


def differences_from_default(config: dict) -> dict:
    """{'a.b': [default value, this run's value]} for every option that differs from the default
    config (flattened keys; a key only one side has shows None on the other). The entry points
    store it in the run folder's info.json as `differs_from_default`."""
    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):       # an empty dict adds no key (its entries would show)
                out.update(flat(value, f"{prefix}{key}."))
            else:   # Sacred's read-only containers as plain JSON values
                out[f"{prefix}{key}"] = list(value) if isinstance(value, (list, tuple)) else value
        return out
    default, current = flat(ex.configurations[0]()), flat(dict(config))
    return {key: [default.get(key), current.get(key)] for key in sorted(set(default) | set(current))
            if default.get(key) != current.get(key)}


# Sacred's own `run_commandline` prints a traceback for any exception; the entry points call `run_sacred(ex)`
# instead: the same command line, but bad input ends as one `error:` line, exit 2 (`--debug`: the
# traceback). It lives here, next to `ex`, so that only the entry points import Sacred.
SACRED_RECORD_FILES = {"config.json", "run.json", "cout.txt", "metrics.json", "info.json"}   # Sacred's own


class _QuietSacred(logging.Filter):
    """Drops Sacred's "Failed after" banner (the `error:` line says what failed) and its warning for a new
    entry under a captured section (eval.snapshots: the config check refused every other new key)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Failed after", "Added new config entry"))


QUIET_SACRED = _QuietSacred()


def install_log_filters(ex) -> None:
    """Sacred logs warnings and errors only, so bad input shows its `error:` line alone (no 'Running
    command' / 'Started run' line before it); the entry points print their run folder themselves."""
    ex.logger = create_basic_stream_logger()   # the root logger with a stderr handler, as Sacred makes it
    ex.logger.setLevel(logging.WARNING)
    logging.getLogger("lslpn").setLevel(logging.ERROR)   # the models' notes (e.g. "random initialisation")
    for logger in (ex.logger, logging.getLogger(ex.path)):
        logger.addFilter(QUIET_SACRED)


def _drop_unstarted_runs(ex) -> None:
    """Remove the run folders that hold Sacred's files only (bad input found before the run wrote a file)."""
    for observer in ex.observers:
        folder = getattr(observer, "dir", None)
        if folder and os.path.isdir(folder) and set(os.listdir(folder)) <= SACRED_RECORD_FILES:
            shutil.rmtree(folder, ignore_errors=True)
            parent = os.path.dirname(folder)
            leftovers = set(os.listdir(parent)) if os.path.isdir(parent) else {"?"}
            if leftovers <= {"_sources"}:                        # nothing else ever ran there
                shutil.rmtree(parent, ignore_errors=True)


def run_sacred(ex, argv: list[str] | None = None):
    """Parse `argv` as Sacred does and run the experiment's main command; returns the Run. Bad input
    (UserError, an output OSError, a Sacred config error) ends as one `error:` line, exit 2."""
    argv = ensure_wellformed_argv(sys.argv if argv is None else argv)
    short_usage, usage, internal_usage = ex.get_usage()
    args = docopt(internal_usage, [str(a) for a in argv[1:]], default_help=False)
    if args["help"] or args["--help"]:
        print(usage)
        sys.exit(0)
    command = args.get("COMMAND") or ex.default_command
    if command not in ex.commands:
        exit_with_message(f"unknown command '{command}': use one of {', '.join(ex.commands)}")
    config_updates, named_configs = get_config_updates(args["UPDATE"])
    install_log_filters(ex)
    try:
        return ex.run(command, config_updates, named_configs, info={}, meta_info={}, options=args)
    except (UserError, OSError) as error:
        message = str(error) if isinstance(error, UserError) else output_error_message(error)
        if args.get("--debug") or message is None:
            raise
        _drop_unstarted_runs(ex)
        exit_with_message(message)
    except SacredError as error:
        if args.get("--debug"):
            raise
        exit_with_message(f"{type(error).__name__}: {error} (check the key against config.py)")
    except KeyboardInterrupt:
        exit_with_message("interrupted by the user", 130)
