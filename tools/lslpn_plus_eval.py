"""Evaluation of LSLPN+ option sets for tools/lslpn_plus.py: one cell under SSL-ALPNet's protocol, timed, and
the head's share of a forward pass."""
from __future__ import annotations

import torch
from bench_timing import measure

from evaluation.adaptation import test_time_model
from evaluation.evaluate import load_snapshot
from models.factory import with_head_options
from models.fewshot import PLUS_DEFAULTS


def model_with(snapshot, options: dict, device: str):
    """(model in eval mode with the option set's head options, its input size); the set's other options
    (test-time adaptation, training options) are not the head's."""
    model, info = load_snapshot(snapshot, device)
    head = {k: v for k, v in options.items() if k in PLUS_DEFAULTS}
    if head:
        model = with_head_options(model, head).eval()
    return model, int(info["input"]["input_size"])


def evaluate_cell(steps, options: dict, cell: dict, device: str) -> dict:
    """{dice: {organ: {query id: Dice}}, seconds (inference, all volumes), adapt_seconds, adaptations,
    volumes (query scans x organs)} of one option set on one cell (query ids of cell['queries'])."""
    head = {k: v for k, v in options.items() if k in PLUS_DEFAULTS}
    adapted = []

    def transform(model):   # the LSLPN+ test-time options, test-time adaptation on stored-resolution views
        model = test_time_model(model, head, options.get("adapt_steps", 0), options.get("adapt_lr", 1e-2),
                                stored_views=True)
        adapted.append(model)
        return model
    dice, _, seconds = steps.evaluate_method(cell["snapshot"], cell["folder"], cell["organs"], device,
                                             queries=cell["queries"], model_transform=transform)
    adapt_seconds = sum(getattr(model, "seconds_adapting", 0.0) for model in adapted)
    return {"dice": dice, "seconds": seconds - adapt_seconds, "adapt_seconds": adapt_seconds,
            "adaptations": sum(getattr(model, "adaptations", 0) for model in adapted),
            "volumes": len(cell["organs"]) * len(cell["queries"])}


def head_share(snapshot, options: dict, device: str, n_queries: int = 16, repeats: int = 5) -> dict:
    """Median seconds (tools/bench_timing.measure) of the encoder and of the head for 1 support +
    n_queries query slices, and the head's share of the two (the time of one inference step)."""
    model, size = model_with(snapshot, options, device)
    generator = torch.Generator().manual_seed(0)
    support = torch.randn(1, 1, 1, 1, size, size, generator=generator).to(device)
    fg = torch.zeros(1, 1, 1, size, size, device=device)
    fg[..., size // 4: size // 2, size // 4: size // 2] = 1
    queries = torch.randn(1, n_queries, 1, size, size, generator=generator).to(device)
    with torch.inference_mode():
        def encode():
            return (model.encoder(support.flatten(0, 2)).unflatten(0, (1, 1, 1)),
                    model.encoder(queries.flatten(0, 1)).unflatten(0, (1, n_queries)))
        support_features, query_features = encode()

        def head_pass():
            prototypes = model.head.compute_prototypes(support_features, fg, 1 - fg, (size, size))
            return model.head.score(prototypes, query_features)
        device_type = torch.device(device)
        encoder = measure(encode, device_type, repeats).median
        head = measure(head_pass, device_type, repeats).median
    return {"encoder_seconds": encoder, "head_seconds": head, "share": head / (encoder + head),
            "n_queries": n_queries, "input_size": size}
