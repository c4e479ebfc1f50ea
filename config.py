"""Experiment configuration (Sacred), shared by train.py and test.py.

Defaults reproduce the paper's set-up (method.md section 3). Named configs:
  paper  the defaults, spelled out
  demo   sized for 2 CPU cores and the synthetic phantom (make demo)
  panet  the PANet global-prototype baseline: n_grid 1 with prototype alignment
  tiny   a seconds-long run for the tests

Override anything on the command line, e.g.
  python train.py with demo fold=2 model.n_grid=4
"""
import sys
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # sacred 0.8.7 on setuptools 80

from docopt import docopt  # noqa: E402
from sacred import Experiment  # noqa: E402
from sacred.arg_parser import get_config_updates  # noqa: E402
from sacred.observers import FileStorageObserver  # noqa: E402,F401  (attached by the entry points)
from sacred.utils import SacredError, ensure_wellformed_argv  # noqa: E402

from util.cli import exit_with_message  # noqa: E402
from util.errors import UserError  # noqa: E402

ex = Experiment("LSLPN", save_git_info=False)


@ex.config
def default_config():
    name = None                 # run folder name under path.log_dir (None: <method>_<class_setting>_fold<F>)
    seed = 1234                 # controls episodes, augmentation, initialisation, evaluation
    device = "auto"             # 'auto' (CUDA when present), 'cpu' or 'cuda'
    amp = False                 # mixed precision: True (CUDA: bf16 where supported, else fp16; CPU: off), 'bf16', 'fp16'
    channels_last = False       # channels_last memory format for the model (CUDA and CPU)
    num_workers = 0             # data loader workers (0: in-process)

    # Folds (method.md section 4): the test organ(s) of each fold; never sampled in its training.
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

    # Augmentation: brightness, contrast, gamma; each with probability p, factor in [low, high].
    augment = {"p": 0.5, "brightness": [0.5, 2.0], "contrast": [0.5, 2.0], "gamma": [0.5, 2.0]}

    model = {
        "encoder": "vgg16",       # 'vgg16' (PANet), 'resnet50_lslpn' (paper), 'cnn_small' (CPU demo)
        "n_grid": 8,              # cells per side; 1 = global prototypes (PANet)
        "overlap": True,          # cell stride half the cell (True) or a full cell (False)
        "vote": "max",            # 'max' (paper), 'mean', 'cover'
        "resolution": "image",    # 'image' (paper semantics) or 'feature' (fast)
        "min_pixels": 10,         # cells with this many or fewer class pixels get no prototype
        "scale": 20.0,            # cosine similarity multiplier (PANet)
        "align": False,           # PANet prototype alignment loss
        "align_weight": 1.0,
    }

    path = {
        "data_dir": "data/prepared",   # output of scripts/prepare_visceral.py
        "init_path": None,             # local ImageNet checkpoint for the encoder (no download ever)
        "log_dir": "runs",             # Sacred observer folders go under here
    }

    # Checkpoints, validation, logging
    save_every = 1000
    val_every = 1000            # volumetric Dice on the held-out silver volumes; keeps best.pth
    print_every = 100
    resume = False              # continue the latest run of this config from its last.pth

    # Evaluation (test.py)
    eval = {
        "preset": "lslpn",        # 'lslpn', 'senet' or 'alpnet' (evaluation/protocol.py)
        "support": "default",     # a patient id, 'default' (10000132 if present else first gold), or 'all'
        "n_shots": 1,
        "snapshots": {},          # method name -> checkpoint path, e.g. {"LSLPN": "runs/.../best.pth"}
        "organs": None,           # organ names to evaluate; None: the fold's label_sets[fold]
        "split": "gold",          # 'gold' (test) or 'val'
        "batch_size": 16,         # query slices per forward pass
        "save_predictions": True, # NIfTI masks in each query's original geometry
    }


@ex.named_config
def paper():
    # The paper's set-up, spelled out (equal to the defaults).
    input_size = 512
    batch_size = 4
    n_steps = 10000
    lr = 1e-3
    lr_milestones = [2500, 5000, 7500]
    model = {"encoder": "vgg16", "n_grid": 8, "overlap": True, "vote": "max"}


@ex.named_config
def panet():
    # PANet baseline: global prototypes with prototype alignment.
    model = {"n_grid": 1, "align": True}


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
    model = {"encoder": "cnn_small", "resolution": "image"}
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
    model = {"encoder": "cnn_small", "resolution": "feature"}
    eval = {"batch_size": 8}


# Sacred's own `run_commandline` prints a traceback for any exception. The entry points call
# `run_sacred(ex)` instead: the same command line (`python train.py with demo fold=2`), but a
# `UserError` or a Sacred configuration error (unknown key, bad value) ends as `error: ...` on one
# line with exit code 2. `--debug` keeps Sacred's behaviour (full traceback). It lives here, next to
# `ex`, so that only the entry points import Sacred.
def run_sacred(ex, argv: list[str] | None = None):
    """Parse `argv` as Sacred does and run the experiment's main command; returns the Run."""
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
    try:
        return ex.run(command, config_updates, named_configs, info={}, meta_info={}, options=args)
    except UserError as error:
        if args.get("--debug"):
            raise
        exit_with_message(str(error))
    except SacredError as error:
        if args.get("--debug"):
            raise
        exit_with_message(f"{type(error).__name__}: {error} (check the key against config.py)")
    except KeyboardInterrupt:
        exit_with_message("interrupted by the user", 130)
