"""The Sacred experiment `ex` of train.py and test.py: defaults, named configs and run_sacred.

The default is the local prototype head on PANet's VGG-16 (ImageNet weights); REPRODUCTION.md lists how it
differs from the authors' code. Override anything, e.g. `python train.py with demo fold=2 model.n_grid=4`.
"""
import copy
import logging
import os
import shutil
import sys
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # sacred 0.8.7 on setuptools 80

from docopt import docopt  # noqa: E402
from sacred import Experiment  # noqa: E402
from sacred.arg_parser import get_config_updates  # noqa: E402
from sacred.config.config_dict import ConfigDict  # noqa: E402
from sacred.utils import SacredError, create_basic_stream_logger, ensure_wellformed_argv  # noqa: E402

from dataloaders.selfsup_episodes import WARP_DEFAULTS  # noqa: E402
from models.fewshot import OFFICIAL_MODEL_CONFIG, PLUS_DEFAULTS  # noqa: E402
from training.objective import SENET_DEFAULTS  # noqa: E402
from util.cli import exit_with_message, restore_interrupt  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.io import output_error_message  # noqa: E402

ex = Experiment("LSLPN", save_git_info=False)


@ex.config
def default_config():
    name = None                 # run folder name under path.log_dir (None: <method>_<class_setting>_fold<F>)
    seed = 1234                 # controls episodes, augmentation, initialisation, evaluation
    device = "auto"             # 'auto' (CUDA when present), 'cpu' or 'cuda'
    amp = False                 # mixed precision: True (CUDA: bf16 if supported, else fp16), 'bf16', 'fp16'
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
    boundary_weight = 0.0       # boundary loss weight (models/boundary_loss.py; beyond the paper), 0: off

    # Augmentation: brightness, contrast, gamma; each with probability p, factor in [low, high].
    augment = {"p": 0.5, "brightness": [0.5, 2.0], "contrast": [0.5, 2.0], "gamma": [0.5, 2.0]}

    # Episodes from 'labels' (organ slices) or 'superpixels' (self-supervised, named config `selfsup`;
    # dataloaders/selfsup_episodes.py: recipe 'project' or 'alpnet', smallest foreground superpixel, warp).
    episodes = "labels"
    selfsup = {"episodes": "project", "min_pixels": 400, "warp": dict(WARP_DEFAULTS)}

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
        "input_slices": 1,        # 2.5D input (beyond the paper): 3 = slices z - 1, z, z + 1 as channels
        **PLUS_DEFAULTS,          # LSLPN+ (docs/lslpn_plus.md): grids, grid_fusion, query_rounds, ...
    }

    senet = dict(SENET_DEFAULTS)  # model.method='senet': fidelity switches, schedule (training/objective.py)

    path = {
        "data_dir": "data/prepared",   # output of scripts/prepare_visceral.py
        "init_path": None,             # local encoder weights (torchvision or official snapshot)
        "init_from": None,             # a train.py checkpoint whose model weights start this run
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
        "head_options": dict(PLUS_DEFAULTS),  # LSLPN+ head options at test time (docs/lslpn_plus.md)
        "adapt_steps": 0,         # test-time adaptation: SGD steps on views of each support slice (0: off)
        "adapt_lr": 1e-2,         # its learning rate
    }


def _named_dict(name: str, values: dict) -> None:
    """Named config from a dict; each use gets a copy (later named configs update Sacred's dicts in place)."""
    ex.named_configs[name] = lambda **kwargs: ConfigDict(copy.deepcopy(values))(**kwargs)


# The authors' code (docs/method.md; REPRODUCTION.md lists how the default differs): their network and head,
# milestones 800/1600/2400, their eval.py.
OFFICIAL = {"lr_milestones": [800, 1600, 2400], "model": OFFICIAL_MODEL_CONFIG,
            "eval": {"preset": "official"}}
_named_dict("official", OFFICIAL)
# The paper's text where it differs from the authors' code: lr x 0.1 every 2,500 steps.
_named_dict("paper", {**OFFICIAL, "lr_milestones": [2500, 5000, 7500]})


# LSLPN+ (docs/lslpn_plus.md), chosen on CHAOS-T2 validation scans: training with the boundary loss; test.py
# applies the multi-scale head (eval.head_options) and test-time adaptation (eval.adapt_steps).
_named_dict("lslpn_plus", {"boundary_weight": 0.3, "eval": {
    "head_options": {"grids": [4, 8], "grid_fusion": "mean"}, "adapt_steps": 20, "adapt_lr": 1e-2}})
# PANet's code: global prototypes with PANet's prototype alignment loss.
_named_dict("panet", {"model": {"head": "panet", "n_grid": 1, "align": True}})
# SENet (Roy et al. 2020, docs/method.md): 20 epochs x 101 batches of 2 one-shot episodes, SGD lr 1e-3,
# momentum 0.99, weight decay 1e-4 per arm, StepLR per `senet`, Dice loss, no augmentation. VISCERAL: the
# released models saw 256 x 256 slices (add input_size=256).
_named_dict("senet", {"model": {"method": "senet"}, "batch_size": 2, "n_steps": 2020, "lr": 1e-3,
                      "momentum": 0.99, "weight_decay": 1e-4, "augment": {"p": 0.0}})
# After `demo senet` (make demo): SENet's 20 epochs squeezed into 200 steps at 64 x 64, lr 1e-2
# (REPRODUCTION.md has the sizing measurements).
_named_dict("senet_demo", {"input_size": 64, "n_steps": 200, "lr": 1e-2, "val_every": 100, "save_every": 100})
# Sized for 2 CPU cores and the synthetic phantom (the phantom studies, the CHAOS CPU budget; `make demo` adds
# make_demo).
_named_dict("demo", {"input_size": 128, "n_steps": 600, "lr": 1e-2, "lr_milestones": [450], "save_every": 100,
                     "val_every": 100, "print_every": 50, "class_setting": "all_structures",
                     "model": {"encoder": "cnn_small", "pretrained": False},
                     "path": {"data_dir": "data/prepared_phantom"}, "eval": {"batch_size": 64}})
# After `demo` (make demo, about 10 minutes with the install on 2 cores): 150 steps of 2 episodes (`demo`: 600
# of 4); bf16 autocast where the CPU has native bf16 (amp=True). SENet: senet_demo's schedule in 100 steps
# (demo/run.py).
# channels_last: not faster on a 2-core AVX2 EPYC (0.95-1.17x), so off. BENCHMARKS.md section 7 measures the
# step and the candidates.
_named_dict("make_demo", {"batch_size": 2, "n_steps": 150, "lr_milestones": [112], "amp": True})
# A seconds-long run for the tests.
_named_dict("tiny", {"input_size": 64, "n_steps": 6, "batch_size": 2, "lr": 1e-2, "lr_milestones": [4],
                     "save_every": 2, "val_every": 3, "print_every": 2, "class_setting": "all_structures",
                     "model": {"encoder": "cnn_small", "resolution": "feature", "pretrained": False},
                     "eval": {"batch_size": 8}})
# Self-supervised episodes from superpixels (no label is read); add to a size config, e.g. `with demo selfsup
# path.data_dir=PREP`, PREP made by scripts/make_superpixels.py.
_named_dict("selfsup", {"episodes": "superpixels"})


def differences_from_default(config: dict) -> dict:
    """{'a.b': [default, this run's value]} of every option that differs from the default config (a key one
    side lacks shows None); the entry points store it in info.json as `differs_from_default`."""
    def flat(tree: dict, prefix: str = "") -> dict:   # an empty dict adds no key; Sacred's lists as lists
        return {k: v for key, value in tree.items() for k, v in (
            flat(value, f"{prefix}{key}.").items() if isinstance(value, dict)
            else [(f"{prefix}{key}", list(value) if isinstance(value, (list, tuple)) else value)])}
    default, current = flat(ex.configurations[0]()), flat(dict(config))
    return {key: [default.get(key), current.get(key)] for key in sorted(set(default) | set(current))
            if default.get(key) != current.get(key)}


SACRED_RECORD_FILES = {"config.json", "run.json", "cout.txt", "metrics.json", "info.json"}   # Sacred's own


def _quiet_sacred(record: logging.LogRecord) -> bool:
    """Drops Sacred's "Failed after" banner (the `error:` line says what failed) and its note on a new
    entry under eval.snapshots (the config check refused every other new key)."""
    return not str(record.msg).startswith(("Failed after", "Added new config entry"))


def install_log_filters(ex) -> None:
    """Sacred logs warnings and errors only, so bad input shows its `error:` line alone; the entry points
    print their run folder themselves."""
    ex.logger = create_basic_stream_logger()   # the root logger with a stderr handler, as Sacred makes it
    ex.logger.setLevel(logging.WARNING)
    logging.getLogger("lslpn").setLevel(logging.ERROR)   # the models' notes (e.g. "random initialisation")
    for logger in (ex.logger, logging.getLogger(ex.path)):
        logger.addFilter(_quiet_sacred)


def _drop_unstarted_runs(ex) -> None:
    """Remove the run folders that hold Sacred's files only (bad input found before the run wrote a file)."""
    for folder in (getattr(observer, "dir", None) for observer in ex.observers):
        if folder and os.path.isdir(folder) and set(os.listdir(folder)) <= SACRED_RECORD_FILES:
            shutil.rmtree(folder, ignore_errors=True)
            parent = os.path.dirname(folder)
            if os.path.isdir(parent) and set(os.listdir(parent)) <= {"_sources"}:   # nothing else ran there
                shutil.rmtree(parent, ignore_errors=True)


def run_sacred(ex, argv: list[str] | None = None):
    """Sacred's command line for the entry points, without its tracebacks: bad input (UserError, an output
    OSError, a Sacred config error) ends as one `error:` line, exit 2 (`--debug`: the traceback)."""
    argv = ensure_wellformed_argv(sys.argv if argv is None else argv)
    _, usage, internal_usage = ex.get_usage()
    args = docopt(internal_usage, [str(a) for a in argv[1:]], default_help=False)
    if args["help"] or args["--help"]:
        print(usage)
        sys.exit(0)
    command = args.get("COMMAND") or ex.default_command
    if command not in ex.commands:
        exit_with_message(f"unknown command '{command}': use one of {', '.join(ex.commands)}")
    config_updates, named_configs = get_config_updates(args["UPDATE"])
    install_log_filters(ex)
    restore_interrupt()
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
