"""Every private DeepSpeed symbol we rely on (parallel/deepspeed_internals.py INTERNALS) still exists in
the installed DeepSpeed with the parameters or the source line we rely on. A DeepSpeed upgrade that
removes or changes one fails here, with the symbol's name, rather than deep inside a training run."""

import importlib
import inspect

import pytest

from parallel.deepspeed_internals import INTERNALS


def resolve(path: str):
    """The object at a dotted path: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


@pytest.mark.parametrize("symbol", list(INTERNALS))
def test_deepspeed_internal_is_still_there(symbol):
    kind, expected = INTERNALS[symbol]
    try:
        obj = resolve(symbol)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"DeepSpeed no longer has {symbol} ({e}): see parallel/deepspeed_internals.py")
    if kind == "params":
        params = list(inspect.signature(obj).parameters)[:len(expected)]
        assert params == expected, f"{symbol}: parameters are now {params}, we call it with {expected}"
    elif kind == "source":
        assert expected in inspect.getsource(obj), f"{symbol} no longer contains `{expected}`"


def test_our_moe_layers_are_deepspeed_moe_layers():
    """The engine enables its expert handling for instances of deepspeed.moe.layer.MoE only."""
    from deepspeed.moe.layer import MoE

    from parallel.deepspeed_internals import MoEMarker

    marker = MoEMarker(num_experts=4, ep_size=2, ep_group=None)
    assert isinstance(marker, MoE)
    assert (marker.num_experts, marker.num_local_experts, marker.expert_group_name) == (4, 2, "ep_size_2")
